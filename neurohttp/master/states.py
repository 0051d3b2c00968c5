"""The master's states, and the moves between them, in one place.

Each worker has a WorkerState; the moves are the table WORKER_MOVES:

    STARTING  -> SERVING    its slot says READY
    SERVING   -> RECYCLING  past max_requests (+ jitter) or max_worker_rss_mb
    STARTING, SERVING, RECYCLING
              -> DRAINING   retired: SIGTERM (a reload's handover, TTOU, its replacement
                            serving, a graceful stop) or SIGQUIT (quick stop); SIGKILL if
                            it is still there at its deadline (graceful_timeout + 1 s)
    DRAINING  -> DRAINING   a quick stop during a graceful one: a shorter deadline
    STARTING, SERVING, RECYCLING, DRAINING
              -> HUNG       no heartbeat for worker_timeout: SIGUSR2 (where are you stuck?)
    HUNG      -> KILLED     it answered, or DUMP_GRACE passed: SIGKILL
    any       -> EXITED     reaped (waitpid); its slot is folded and it leaves the table

The master as a whole is in a Phase, about its newest generation of workers
(PHASE_MOVES):

    STARTING  -> SERVING    every worker id has a SERVING worker of the newest generation:
                            the older generations retire, removed addresses close
    STARTING  -> FAILING    a worker of the newest generation died
    FAILING   -> SERVING    as from STARTING
    SERVING, FAILING
              -> STARTING   a reload switched to a new generation. A HUP while STARTING only
                            notes one more reload, done when the generation serves (a burst
                            of HUPs starts one generation at a time, and the last config wins);
                            while FAILING it reloads at once (the new config may be the fix)
    any       -> STOPPING   TERM, INT or QUIT: nothing new starts; the loop ends with the
                            last worker

Moves go through `WorkerProc.to` and `Master.move_to`, which refuse a move the
tables do not list: a bug in the loop shows as an error naming the move, not as
a worker lost between two flags. A refused reload is not a move: it puts back
what it changed, the phase included.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerState(enum.Enum):
    STARTING = "starting"    # forked; its slot does not say READY yet
    SERVING = "serving"      # its slot says READY: accepting, steered to
    RECYCLING = "recycling"  # serving past max_requests or max_worker_rss_mb: retires once its
                             # replacement serves
    DRAINING = "draining"    # told to stop (TERM: reload, TTOU, recycling, stop; QUIT: quick
                             # stop); SIGKILLed if still there at its deadline
    HUNG = "hung"            # missed its heartbeat for worker_timeout; asked (USR2) where it is
                             # stuck; SIGKILLed once it says or DUMP_GRACE later
    KILLED = "killed"        # SIGKILLed after hanging; waiting to be reaped
    EXITED = "exited"        # reaped and its slot folded: gone from the table


S = WorkerState
WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    S.STARTING: frozenset({S.SERVING, S.DRAINING, S.HUNG, S.EXITED}),
    S.SERVING: frozenset({S.RECYCLING, S.DRAINING, S.HUNG, S.EXITED}),
    S.RECYCLING: frozenset({S.DRAINING, S.HUNG, S.EXITED}),
    S.DRAINING: frozenset({S.DRAINING, S.HUNG, S.EXITED}),
    S.HUNG: frozenset({S.KILLED, S.EXITED}),
    S.KILLED: frozenset({S.EXITED}),
    S.EXITED: frozenset(),
}
# Not yet told to stop: these can be retired, recycled, counted as serving.
RUNNING = frozenset({S.STARTING, S.SERVING, S.RECYCLING})
# Accepting connections: what steering and "is any worker ready" look at.
ACCEPTING = frozenset({S.SERVING, S.RECYCLING})


class Phase(enum.Enum):
    STARTING = "starting"    # the newest generation (the first one too) is starting
    FAILING = "failing"      # ... and one of its workers died
    SERVING = "serving"      # every worker id has a serving worker of the newest generation
    STOPPING = "stopping"    # TERM/INT/QUIT: waiting for the workers to exit


P = Phase
PHASE_MOVES: dict[Phase, frozenset[Phase]] = {
    P.STARTING: frozenset({P.SERVING, P.FAILING, P.STOPPING}),
    P.FAILING: frozenset({P.SERVING, P.STARTING, P.STOPPING}),
    P.SERVING: frozenset({P.STARTING, P.STOPPING}),
    P.STOPPING: frozenset({P.STOPPING}),   # a quick stop during a graceful one
}


class IllegalMove(Exception):
    """A move the tables do not list: a bug in the master."""


@dataclass
class WorkerProc:
    pid: int
    slot: int                 # its stats-block slot
    worker_id: int            # N of "worker N": it inherits socket N-1 of every address
    generation: int
    started: float            # monotonic seconds at fork
    max_requests: int = 0     # recycled after this many requests (0: never)
    state: WorkerState = WorkerState.STARTING
    deadline: float = 0.0     # DRAINING: SIGKILL then; HUNG: SIGKILL then at the latest
    reason: str = ""          # RECYCLING: why it is replaced (logged when it retires)
    stuck_on: str = ""        # HUNG, KILLED: what it said it was stuck on
    # Steering's view, not a lifecycle state: a SERVING or RECYCLING worker whose
    # heartbeat is 1.5 s late gets no new connections until it stamps again.
    late: bool = False

    def to(self, state: WorkerState, deadline: float = 0.0, reason: str = "") -> None:
        if state not in WORKER_MOVES[self.state]:
            raise IllegalMove(f"worker {self.worker_id} (pid {self.pid}): "
                              f"{self.state.name} -> {state.name}")
        self.state = state
        self.deadline = deadline
        if reason:
            self.reason = reason

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    @property
    def accepting(self) -> bool:
        return self.state in ACCEPTING

    @property
    def hung(self) -> bool:
        """It missed its heartbeat (HUNG, or KILLED for it)."""
        return self.state in (WorkerState.HUNG, WorkerState.KILLED)
