"""The master's decisions, driven turn by turn with a fake process table (as
gunicorn's arbiter tests do): fork, kill, waitpid and the clock are a
FakeSystem; the stats block is a real one in this process, where the "workers"
say they are ready, stamp heartbeats and count requests as real ones do. No
process is started; each test takes milliseconds. The real-process tests
(test_master.py, test_reload.py, test_ops.py) prove the same against a real
server."""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
from server import to_toml

from neurohttp import config
from neurohttp.master import arbiter
from neurohttp.master.arbiter import Master
from neurohttp.master.states import (
    PHASE_MOVES,
    WORKER_MOVES,
    IllegalMove,
    Phase,
    WorkerProc,
    WorkerState,
)
from neurohttp.master.system import System
from neurohttp.stats import layout as L
from neurohttp.stats.block import StatsBlock
from neurohttp.stats.layout import Geometry

W = WorkerState


class FakeSystem(System):
    """A process table: fork hands out pids, kill records the signal (SIGKILL
    ends the process), exits are reaped on the next turn."""

    def __init__(self) -> None:
        super().__init__()
        self.now = time.monotonic()   # the clock the heartbeats in the block are stamped with
        self.next_pid = 1000
        self.alive: set[int] = set()
        self.exits: list[tuple[int, int]] = []
        self.sent: list[tuple[int, int]] = []
        self.forks = 0
        self.fork_error: OSError | None = None
        self.rss_of: dict[int, int] = {}

    def fork(self) -> int:
        self.forks += 1
        if self.fork_error is not None:
            raise self.fork_error
        self.next_pid += 1
        self.alive.add(self.next_pid)
        return self.next_pid

    def kill(self, pid: int, sig: int) -> None:
        if pid in self.alive:
            self.sent.append((pid, sig))
            if sig == signal.SIGKILL:
                self.exit(pid, -signal.SIGKILL)

    def exit(self, pid: int, code: int) -> None:
        self.alive.discard(pid)
        self.exits.append((pid, code))

    def reap(self) -> list[tuple[int, int]]:
        out, self.exits = self.exits, []
        return out

    def monotonic(self) -> float:
        return self.now

    def rss(self, pid: int) -> int | None:
        return self.rss_of.get(pid)

    def signals_to(self, pid: int) -> list[int]:
        return [sig for p, sig in self.sent if p == pid]


class World:
    """A Master on a FakeSystem, and what its workers would do."""

    def __init__(self, tmp: Path, server: dict[str, object]) -> None:
        self.path = tmp / "neurohttp.toml"
        self.write({"server": {"workers": 2, "pid_file": str(tmp / "n.pid"), **server}})
        self.sys = FakeSystem()
        self.m = Master(config.load(str(self.path)), system=self.sys)
        self.m.block = StatsBlock.create(f"neurohttp-test-{uuid.uuid4().hex[:12]}",
                                         Geometry(max_workers=4))

    def write(self, doc: dict[str, object]) -> None:
        self.path.write_text(to_toml(doc))

    def close(self) -> None:
        assert self.m.block is not None
        self.m.block.unlink()

    # ---- the loop
    def turn(self, seconds: float = 0.0, silent: tuple[WorkerProc, ...] = ()) -> bool:
        """Let `seconds` pass (the workers stamping their heartbeats, but not the
        `silent` ones), then one turn."""
        self.sys.now += seconds
        self.beat(*silent)
        return self.m.step()

    def signal(self, sig: int) -> bool:
        self.m.signals.append(sig)
        return self.turn()

    # ---- the workers
    def slot(self, w: WorkerProc) -> memoryview:
        assert self.m.block is not None
        return self.m.block.slot(w.slot)

    def ready(self, *workers: WorkerProc) -> None:
        for w in workers:
            self.slot(w)[L.S_STATE] = L.STATE_READY

    def beat(self, *skip: WorkerProc) -> None:
        for w in self.m.workers.values():
            if w not in skip and w.pid in self.sys.alive:
                self.slot(w)[L.S_HEARTBEAT] = int(self.sys.now * 1000)

    def drained(self) -> None:
        """Every worker told to stop (TERM or QUIT) exits 0."""
        for w in list(self.m.workers.values()):
            if w.pid in self.sys.alive and ({signal.SIGTERM, signal.SIGQUIT}
                                            & set(self.sys.signals_to(w.pid))):
                self.sys.exit(w.pid, 0)

    def of(self, *states: WorkerState, generation: int | None = None) -> list[WorkerProc]:
        return sorted((w for w in self.m.workers.values() if w.state in states
                       and (generation is None or w.generation == generation)),
                      key=lambda w: (w.generation, w.worker_id))

    def serving(self) -> list[WorkerProc]:
        """Start the first generation and make it serve."""
        self.m._maintain()
        self.ready(*self.of(W.STARTING))
        self.turn()
        workers = self.of(W.SERVING)
        assert len(workers) == self.m.target and self.m.phase is Phase.SERVING
        return workers


@pytest.fixture
def world(tmp_path):
    made: list[World] = []

    def make(**server: object) -> World:
        w = World(tmp_path, server)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


# ------------------------------------------------------------------ the tables
def test_every_state_has_its_moves_and_every_worker_can_end():
    assert set(WORKER_MOVES) == set(WorkerState) and set(PHASE_MOVES) == set(Phase)
    for state, moves in WORKER_MOVES.items():
        assert state is W.EXITED or W.EXITED in moves, state
    w = WorkerProc(1, 1, 1, 1, 0.0)
    with pytest.raises(IllegalMove, match="STARTING -> KILLED"):
        w.to(W.KILLED)   # only a hung worker is killed for it
    w.to(W.SERVING)
    w.to(W.DRAINING, deadline=5.0)
    with pytest.raises(IllegalMove, match="DRAINING -> SERVING"):
        w.to(W.SERVING)  # a worker told to stop never serves again
    assert w.state is W.DRAINING and w.deadline == 5.0


def test_a_reload_while_a_generation_starts_is_not_a_move():
    assert Phase.STARTING not in PHASE_MOVES[Phase.STARTING]


# ------------------------------------------------------------------ start, handover
def test_first_generation_starts_then_serves(world):
    t = world()
    t.m._maintain()
    starting = t.of(W.STARTING)
    assert [w.worker_id for w in starting] == [1, 2] and t.sys.forks == 2
    assert t.m.phase is Phase.STARTING
    t.ready(starting[0])
    t.turn()
    assert starting[0].state is W.SERVING and t.m.phase is Phase.STARTING
    t.ready(starting[1])
    t.turn()
    assert t.m.phase is Phase.SERVING and t.sys.forks == 2 and t.sys.sent == []


def test_reload_hands_over_once_every_new_worker_serves(world):
    t = world()
    old = t.serving()
    t.signal(signal.SIGHUP)
    new = t.of(W.STARTING, generation=2)
    assert t.m.generation == 2 and t.m.phase is Phase.STARTING and len(new) == 2
    t.ready(new[0])
    t.turn()
    # one new worker serves: the old ones still serve, nothing is told to stop
    assert all(w.state is W.SERVING for w in old) and t.sys.sent == []
    t.ready(new[1])
    t.turn()
    assert all(w.state is W.DRAINING for w in old) and t.m.phase is Phase.SERVING
    assert [t.sys.signals_to(w.pid) for w in old] == [[signal.SIGTERM]] * 2
    t.drained()
    t.turn()
    assert sorted(t.m.workers) == sorted(w.pid for w in new)
    assert t.m.block.words[L.H_RESTARTS] == 0 and t.m.block.words[L.H_RELOADS] == 1


def test_hups_while_a_generation_starts_coalesce_into_one_more_reload(world):
    t = world()
    t.serving()
    t.signal(signal.SIGHUP)
    assert t.m.generation == 2
    for _ in range(5):   # a burst while generation 2 starts
        t.signal(signal.SIGHUP)
    t.write({"server": {"workers": 3, "pid_file": t.m.cfg.server.pid_file}})  # the last config
    assert t.m.generation == 2 and t.m.reload_pending
    assert {w.generation for w in t.of(W.STARTING)} == {2}
    t.ready(*t.of(W.STARTING))
    t.turn()
    # generation 2 serves: the old one retires, and one more reload reads the file as it is now
    assert t.m.generation == 3 and t.m.phase is Phase.STARTING and not t.m.reload_pending
    t.turn()
    assert {w.generation for w in t.of(W.STARTING)} == {3} and len(t.of(W.STARTING)) == 3
    t.ready(*t.of(W.STARTING))
    t.turn()
    assert t.m.phase is Phase.SERVING and t.m.block.words[L.H_RELOADS] == 2
    assert [w.generation for w in t.of(W.SERVING)] == [3, 3, 3]


def test_a_hup_while_the_new_generation_fails_reloads_at_once(world):
    t = world()
    t.serving()
    t.signal(signal.SIGHUP)
    bad = t.of(W.STARTING, generation=2)
    t.sys.exit(bad[0].pid, 1)   # dies before it is ready
    t.turn()
    assert t.m.phase is Phase.FAILING
    t.signal(signal.SIGHUP)     # the new config may be the fix: not deferred
    assert t.m.generation == 3 and t.m.phase is Phase.STARTING


# ------------------------------------------------------------------ start failures
def test_workers_failing_at_start_back_off_then_the_master_gives_up(world, caplog):
    t = world(workers=1)
    t.m._maintain()
    delays = []
    with caplog.at_level(logging.WARNING, logger="neurohttp"):
        for _ in range(arbiter.MAX_START_FAILURES):
            [w] = t.of(W.STARTING)
            t.m.block.write_text(w.slot, "RuntimeError: no database")
            t.sys.exit(w.pid, 1)
            forks = t.sys.forks
            t.turn()
            if t.m.phase is Phase.STOPPING:
                break
            delay = t.m.backoff[1].until - t.sys.now
            delays.append(round(delay, 3))
            t.turn(delay * 0.9)
            assert t.sys.forks == forks   # not before its time
            t.turn(delay * 0.2)
            assert t.sys.forks == forks + 1
    assert delays == [0.1, 0.2, 0.4, 0.8]
    assert t.m.exit_code == arbiter.EXIT_NO_WORKER and t.m.phase is Phase.STOPPING
    assert "no worker can start (5 tries); giving up. The worker's error: RuntimeError: no " \
           "database" in caplog.text
    assert t.turn() is False   # no worker left: the loop ends


def test_a_fork_failure_backs_off_and_the_serving_workers_are_left_alone(world, caplog):
    """EAGAIN from fork (a process limit) used to reach run()'s handler, which
    SIGKILLed every worker and exited."""
    t = world()
    serving = t.serving()
    t.sys.fork_error = OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    slots_before = t.m.block.live_slots()
    with caplog.at_level(logging.WARNING, logger="neurohttp"):
        assert t.signal(signal.SIGTTIN) is True
    assert "worker failed at start (fork failed: Resource temporarily unavailable); next try " \
           "in 0.1 s (worker 3)" in caplog.text
    assert t.m.block.live_slots() == slots_before   # the slot it took is free again
    assert all(w.state is W.SERVING for w in serving) and t.sys.sent == []
    forks = t.sys.forks
    for _ in range(8):   # 0.1, 0.2, 0.4, ... up to 10 s; never gives up while others serve
        t.turn(t.m.backoff[3].until - t.sys.now + 0.001)
    assert t.sys.forks == forks + 8 and t.m.phase is Phase.SERVING
    assert t.m.backoff[3].until - t.sys.now == arbiter.MAX_BACKOFF
    t.sys.fork_error = None
    t.turn(arbiter.MAX_BACKOFF + 0.001)
    [third] = t.of(W.STARTING)
    assert third.worker_id == 3
    t.ready(third)
    t.turn(arbiter.START_GRACE)
    assert 3 not in t.m.backoff   # it served: a later failure starts from 0.1 s again
    assert t.m.exit_code == 0 and all(w.state is W.SERVING for w in serving)


def test_a_fork_failure_at_start_gives_up_after_five_tries(world):
    t = world()
    t.sys.fork_error = OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    start = t.sys.now
    t.m._maintain()
    while t.m.phase is not Phase.STOPPING:
        t.turn(0.05)
        assert t.sys.now - start < 10, "never gave up"
    assert t.m.exit_code == arbiter.EXIT_NO_WORKER and t.m.workers == {}
    assert t.m.block.live_slots() == []


def test_the_real_fork_failing_is_handled_too(tmp_path, monkeypatch):
    """The same through the real System (os.fork patched): no exception leaves spawn()."""
    path = tmp_path / "n.toml"
    path.write_text(to_toml({"server": {"workers": 1, "pid_file": str(tmp_path / "n.pid")}}))
    m = Master(config.load(str(path)))
    m.block = StatsBlock.create(f"neurohttp-test-{uuid.uuid4().hex[:12]}", Geometry(max_workers=2))
    try:
        def no_fork() -> int:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        monkeypatch.setattr(os, "fork", no_fork)
        assert m.spawn(1) is None
        assert m.backoff[1].failures == 1 and m.block.live_slots() == [] and m.workers == {}
    finally:
        m.block.unlink()


# ------------------------------------------------------------------ recycling
def test_a_worker_past_max_requests_retires_once_its_replacement_serves(world, caplog):
    t = world(workers=1, max_requests=100)
    [old] = t.serving()
    t.slot(old)[L.S_REQUESTS] = old.max_requests
    t.turn()
    assert old.state is W.RECYCLING
    [new] = t.of(W.STARTING)
    assert new.worker_id == old.worker_id and t.sys.sent == []  # the replacement first
    t.turn()
    assert old.state is W.RECYCLING   # still serving while the new one starts
    with caplog.at_level(logging.INFO, logger="neurohttp"):
        t.ready(new)
        t.turn()
    assert old.state is W.DRAINING and t.sys.signals_to(old.pid) == [signal.SIGTERM]
    assert "recycled: served 100 requests (max_requests 100 + jitter)" in caplog.text


def test_a_worker_over_max_worker_rss_mb_is_recycled(world):
    t = world(workers=1, max_worker_rss_mb=64)
    [w] = t.serving()
    t.sys.rss_of[w.pid] = 63 << 20
    t.turn(arbiter.RSS_CHECK_EVERY)
    assert w.state is W.SERVING
    t.sys.rss_of[w.pid] = 65 << 20
    t.turn(arbiter.RSS_CHECK_EVERY)
    assert w.state is W.RECYCLING and "RSS 65.0 MiB over max_worker_rss_mb 64" in w.reason


# ------------------------------------------------------------------ heartbeats, deadlines
def test_a_hung_worker_is_asked_where_it_is_stuck_then_killed_and_replaced(world, caplog):
    t = world(worker_timeout=2)
    hung, other = t.serving()
    t.turn(1.9, silent=(hung,))
    assert hung.state is W.SERVING
    with caplog.at_level(logging.WARNING, logger="neurohttp"):
        t.turn(0.2, silent=(hung,))
        assert hung.state is W.HUNG and t.sys.signals_to(hung.pid) == [signal.SIGUSR2]
        assert other.state is W.SERVING
        t.m.block.write_text(hung.slot, "stuck on GET /slow from 127.0.0.1")  # its dump
        t.turn(silent=(hung,))
        assert hung.state is W.KILLED
        assert t.sys.signals_to(hung.pid) == [signal.SIGUSR2, signal.SIGKILL]
        t.turn()   # reaped: replaced
    assert "killed after missing its heartbeat; it was stuck on GET /slow" in caplog.text
    [new] = t.of(W.STARTING)
    assert new.worker_id == hung.worker_id and t.m.block.words[L.H_RESTARTS] == 1


def test_a_hung_worker_that_cannot_answer_is_killed_after_dump_grace(world):
    t = world(worker_timeout=1)
    w, _ = t.serving()
    t.turn(1.5, silent=(w,))
    assert w.state is W.HUNG
    t.turn(arbiter.DUMP_GRACE * 0.5, silent=(w,))
    assert w.state is W.HUNG
    t.turn(arbiter.DUMP_GRACE * 0.6, silent=(w,))
    assert w.state is W.KILLED


def test_a_draining_worker_is_killed_at_graceful_timeout_plus_kill_grace(world, caplog):
    t = world(workers=2, graceful_timeout=3)
    t.serving()
    t.signal(signal.SIGTTOU)
    [w] = t.of(W.DRAINING)
    assert w.worker_id == 2 and t.sys.signals_to(w.pid) == [signal.SIGTERM]
    t.turn(3 + arbiter.KILL_GRACE - 0.01)
    assert t.sys.signals_to(w.pid) == [signal.SIGTERM]
    with caplog.at_level(logging.WARNING, logger="neurohttp"):
        t.turn(0.02)
    assert t.sys.signals_to(w.pid) == [signal.SIGTERM, signal.SIGKILL]
    assert "did not exit in time" in caplog.text
    t.turn()
    assert w.pid not in t.m.workers and t.m.block.words[L.H_RESTARTS] == 0


def test_ttou_retires_the_highest_worker_id_and_ttin_adds_one(world):
    t = world(workers=3)
    t.serving()
    t.signal(signal.SIGTTOU)
    assert [w.worker_id for w in t.of(W.DRAINING)] == [3]
    t.drained()
    t.signal(signal.SIGTTIN)
    [new] = t.of(W.STARTING)
    assert new.worker_id == 3 and t.m.target == 3


# ------------------------------------------------------------------ stop
def test_graceful_stop_drains_everyone_and_a_quick_one_shortens_the_wait(world):
    t = world(graceful_timeout=30)
    workers = t.serving()
    t.signal(signal.SIGTERM)
    assert all(w.state is W.DRAINING for w in workers) and t.m.phase is Phase.STOPPING
    assert all(w.deadline == t.sys.now + 30 + arbiter.KILL_GRACE for w in workers)
    t.signal(signal.SIGINT)
    assert all(w.deadline == t.sys.now + arbiter.QUICK_STOP_WAIT for w in workers)
    assert [t.sys.signals_to(w.pid) for w in workers] == [[signal.SIGTERM, signal.SIGQUIT]] * 2
    t.sys.exit(workers[0].pid, 0)
    assert t.turn() is True
    assert t.turn(arbiter.QUICK_STOP_WAIT + 0.01) is True   # the last one SIGKILLed ...
    assert t.turn() is False                                # ... and reaped: done


# ------------------------------------------------------------------ no growth
def test_reload_after_reload_leaves_nothing_behind(world):
    """The master's RSS grew on reloads (a soak saw +1 MiB per reload); its own
    bookkeeping must not: after many reloads it holds the workers, slots and
    configs of two generations at most, and no line of neurohttp keeps more
    allocations alive (tracemalloc) than it did 40 reloads earlier."""
    t = world()
    t.serving()

    def reload_once() -> None:
        t.sys.sent.clear()   # the fake's own record
        t.signal(signal.SIGHUP)
        t.ready(*t.of(W.STARTING))
        t.turn()
        t.drained()
        t.turn()

    def ours() -> tracemalloc.Snapshot:
        gc.collect()
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, str(Path(arbiter.__file__).parent.parent / "*"))])
    tracemalloc.start()
    try:
        for _ in range(10):
            reload_once()
        before = ours()
        for _ in range(40):
            reload_once()
        after = ours()
    finally:
        tracemalloc.stop()
    grew = [d for d in after.compare_to(before, "lineno") if d.count_diff > 0]
    assert sum(d.count_diff for d in grew) < 20, "\n".join(map(str, grew[:10]))
    assert len(t.m.workers) == 2 and len(t.m.block.live_slots()) == 2
    assert t.m.backoff == {} and t.m.removed == [] and t.m.generation == 51
    assert sum(isinstance(o, config.Config) for o in gc.get_objects()) <= 2  # old ones let go
