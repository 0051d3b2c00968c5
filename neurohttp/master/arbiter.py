"""The master's supervision loop.

Signal handlers only record the signal (and wake the loop through the wakeup
fd); everything is done by the loop, one turn (`step`) at a time: signals,
reaping, heartbeats, recycling, deadlines, then the decisions that keep the
worker count (`_maintain`), then steering. The states of the workers and of
the master, and the moves between them, are in states.py; the calls to the
operating system go through a `System` (system.py), which tests replace with
a fake process table.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import select
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass

import orjson

from .. import config as config_mod
from .. import fdlimit, tlsconfig
from ..config import Config
from ..shared.deployments import KIND_DEPLOYMENT, KIND_MODEL, RouterStateFull, config_fingerprints
from ..stats import layout as L
from ..stats.block import BlockInUse, StatsBlock, block_name
from ..stats.sizing import geometry_for
from . import pidfile
from .sockets import BindError, Listener, describe, open_listeners
from .states import PHASE_MOVES, IllegalMove, Phase, WorkerProc, WorkerState
from .system import System

log = logging.getLogger("neurohttp")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
LOOP_WAIT = 0.2
QUICK_STOP_WAIT = 3.0
# A worker that dies before it is ready, or sooner than this after starting,
# failed at start: the next try waits (back-off).
START_GRACE = 1.0
MAX_START_FAILURES = 5
FIRST_BACKOFF = 0.1     # doubling after each failure in a row ...
MAX_BACKOFF = 10.0      # ... up to this
# After SIGUSR2 asks a hung worker where it is stuck, wait this long for its
# answer before SIGKILL.
DUMP_GRACE = 1.0
RSS_CHECK_EVERY = 1.0   # seconds between RSS checks (max_worker_rss_mb)
EXIT_NO_WORKER = 3      # no worker could start (gunicorn's WORKER_BOOT_ERROR)
# A draining worker ends its own drain at graceful_timeout plus 0.5 s for its cut
# streams' last events (worker.CUT_FLUSH); the master kills it 0.5 s after that.
KILL_GRACE = 1.0
KILL_AGAIN = 5.0        # a worker SIGKILLed at its deadline and still not reaped
# Workers stamp their heartbeat every 0.5 s. One whose stamp is older than this
# gets no new connections (its loop is stuck or the process stopped) until it
# stamps again; worker_timeout later it is killed.
STEER_LATE_MS = 1500

W = WorkerState


class StartupError(Exception):
    """The master cannot start; the message says why."""


@dataclass
class Backoff:
    """Start failures in a row of one worker id, and when it may be tried again."""

    failures: int = 0
    until: float = 0.0


class Master:
    def __init__(self, cfg: Config, overrides: dict[str, dict[str, object]] | None = None,
                 notify_fd: int = -1, system: System | None = None) -> None:
        self.cfg = cfg
        self.notify_fd = notify_fd   # --daemon: tell the waiting `start` how it went
        self.overrides = overrides or {}
        self.system = system or System()
        self.pid = os.getpid()
        self.started = time.time()
        self.block: StatsBlock | None = None
        self.listeners: list[Listener] = []
        # The TLS listeners' context, built here before any fork (tlsconfig.py).
        self.tls: tlsconfig.ServerTLS | None = None
        self.removed: list[Listener] = []   # dropped by a reload; closed once old workers go
        self.workers: dict[int, WorkerProc] = {}
        self.target = cfg.worker_count
        self.generation = 1
        self.phase = Phase.STARTING          # the first generation is starting
        self.reload_pending = False          # a HUP came while the newest generation started
        self.signals: list[int] = []
        self.stop_deadline = 0.0             # STOPPING: the loop ends by then at the latest
        self.backoff: dict[int, Backoff] = {}   # worker id -> its start failures
        self.exit_code = 0
        self.steering = True         # False once the kernel refused a steering program
        self.slots_full = False      # "no free stats slot" was logged (once per episode)
        self._next_rss_check = 0.0
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------ start
    def start(self) -> None:
        """Everything before the first fork; raises StartupError with a clear message."""
        cfg = self.cfg
        pid_path = cfg.server.pid_file
        # The title first: `neurohttpd stop/status` believe a pid file only when
        # its pid has this title.
        try:
            from setproctitle import setproctitle
            setproctitle(pidfile.MASTER_TITLE + (f" {cfg.path}" if cfg.path else ""))
        except ImportError:
            pass
        found = pidfile.inspect(pid_path)
        if found.master and found.pid != self.pid:
            raise StartupError(f"already running: master pid {found.pid} (pid file {pid_path})")
        if found.stale:
            log.warning("stale pid file %s (%s); replacing it", pid_path, found.stale)
        try:
            self.tls = tlsconfig.load(cfg)
        except config_mod.ConfigError as e:
            raise StartupError(str(e)) from None
        self._log_tls()
        try:
            self.listeners = open_listeners(cfg.binds, self.target, cfg.server.backlog,
                                            cfg.tls_binds)
        except BindError as e:
            raise StartupError(str(e)) from None
        fdlimit.prepare(cfg.server.max_connections)  # before any fork: workers inherit it
        try:
            self.block = StatsBlock.create(block_name(pid_path), geometry_for(cfg))
        except BlockInUse as e:
            self._close_listeners()
            raise StartupError(str(e)) from None
        if self.block.stale_pid >= 0:
            log.warning("replaced the stale stats block %s left by master pid %d",
                        self.block.shm.name, self.block.stale_pid)
        try:
            pidfile.write(pid_path, self.pid)
        except OSError as e:
            raise StartupError(f"cannot write pid file {pid_path}: {e.strerror}") from None
        self.block.words[L.H_GENERATION] = self.generation
        self._assign_router(cfg, self.generation)
        self._publish_info()
        # Load what every worker needs once, before forking, so its pages are
        # shared and a new worker does not spend ~150 ms importing.
        from ..ai import tokenizer
        from ..worker import worker  # noqa: F401  (the worker's modules: handlers, wsproto)
        tokenizer.preload()
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
        gc.collect()
        gc.freeze()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)
        log.info("neurohttpd master %d listening on %s with %d workers", self.pid,
                 ", ".join(lst.label for lst in self.listeners), self.target)

    def _log_tls(self) -> None:
        """The config's warnings (TLS certificates, unset api_key_env variables)."""
        if self.tls is not None:
            for warning in self.tls.warnings:
                log.warning("%s", warning)
        for warning in config_mod.warnings(self.cfg):
            log.warning("%s", warning)

    def _publish_info(self) -> None:
        """Facts `neurohttpd status` shows that the counters do not hold."""
        assert self.block is not None
        self.block.write_text(0, orjson.dumps({
            "config": self.cfg.path, "pid_file": os.path.abspath(self.cfg.server.pid_file),
            "binds": [lst.address for lst in self.listeners if not lst.tls],
            "tls_binds": [lst.address for lst in self.listeners if lst.tls], "target": self.target,
            "started": self.started}).decode())

    def _notify(self, msg: str) -> None:
        if self.notify_fd >= 0:
            try:
                os.write(self.notify_fd, msg.encode())
            except OSError:
                pass
            os.close(self.notify_fd)
            self.notify_fd = -1

    def _record_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        try:
            try:
                self.start()
            except StartupError as e:
                log.error("%s", e)
                self._notify(f"error {e}")
                return 1
            except BaseException as e:
                self._notify(f"error {e!r}")
                raise
            self._notify(f"ok {self.pid}")
            self._loop()
        except Exception:
            log.exception("master failed")
            self.exit_code = 1
            self._kill_all(signal.SIGKILL)
        finally:
            # However the master ends (a signal's stop, a failed start, an
            # exception), the shared memory and the pid file go with it.
            self.cleanup()
        log.info("neurohttpd master %d exiting (%d)", self.pid, self.exit_code)
        return self.exit_code

    def _loop(self) -> None:
        self._maintain()
        while True:
            self._wait()
            if not self.step():
                break

    def step(self) -> bool:
        """One turn of the loop (after its wait); False once the master is done."""
        self._handle_signals()
        self._reap()
        self._observe()
        if self.phase is Phase.STOPPING:
            self._enforce_deadlines()
            return bool(self.workers)
        self._check_heartbeats()
        self._check_recycling()
        self._enforce_deadlines()
        self._maintain()
        self._steer()
        return True

    def _wait(self) -> None:
        if self.signals:
            return
        try:
            select.select([self._wake_r], [], [], LOOP_WAIT)
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def move_to(self, phase: Phase) -> None:
        if phase not in PHASE_MOVES[self.phase]:
            raise IllegalMove(f"master: {self.phase.name} -> {phase.name}")
        self.phase = phase

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                continue  # _reap runs every turn
            if sig == signal.SIGTERM:
                self.begin_stop(graceful=True)
            elif sig in (signal.SIGINT, signal.SIGQUIT):
                self.begin_stop(graceful=False)
            elif self.phase is Phase.STOPPING:
                continue
            elif sig == signal.SIGHUP:
                self.request_reload()
            elif sig == signal.SIGUSR1:
                self.reopen_logs()
            elif sig == signal.SIGTTIN:
                if self._room_for(self.target + 1, "TTIN refused"):
                    self.target += 1
                    log.info("TTIN: %d workers", self.target)
                    self._publish_info()
            elif sig == signal.SIGTTOU:
                if self.target > 1:
                    self.target -= 1
                    log.info("TTOU: %d workers", self.target)
                    self._publish_info()
                else:
                    log.info("TTOU ignored: never fewer than one worker")

    def _room_for(self, workers: int, what: str) -> bool:
        """Whether the stats block has slots for `workers` (and a reload's second
        generation beside them); if not, say what to change."""
        most = self._max_workers()
        if workers <= most:
            return True
        log.error("%s: %d workers is more than the stats block was sized for at start (%d); "
                  "raise [stats] max_workers and restart", what, workers, most)
        return False

    # ------------------------------------------------------------ spawning
    def spawn(self, worker_id: int) -> WorkerProc | None:
        """Fork worker `worker_id` of the current generation. None if it cannot
        start now: no free stats slot (retried every turn), or a socket or the
        fork failed (retried after a back-off, see _start_failed)."""
        assert self.block is not None
        try:
            # Its sockets first: a worker id past the sockets (TTIN) needs new ones.
            for lst in self.listeners:
                lst.ensure(worker_id)
        except BindError as e:
            self._start_failed(worker_id, str(e))
            return None
        index = self.block.reserve_slot(worker_id, self.generation)
        if index < 0:
            # Every slot is held, by draining workers among others (a reload
            # needs at most two generations' worth, see _max_workers): wait for
            # them to exit, retrying every loop turn, and say so once.
            if not self.slots_full:
                log.warning("no free stats slot for worker %d: all %d are held by starting, "
                            "serving or draining workers; it starts when one exits",
                            worker_id, self.block.nslots - 1)
                self.slots_full = True
            return None
        self.slots_full = False
        socks = [lst.socket_for(worker_id - 1) for lst in self.listeners]
        contexts = [self._context_for(lst) for lst in self.listeners]
        try:
            pid = self.system.fork()
        except OSError as e:
            self.block.fold(index)  # frees the slot (nothing was counted in it)
            self._start_failed(worker_id, f"fork failed: {e.strerror or e}")
            return None
        if pid == 0:  # child
            code = 1
            try:
                self._in_child(socks)
                from ..worker.worker import run_worker
                code = run_worker(self.cfg, self.block, index, worker_id, socks, self.pid,
                                  tls=contexts)
            except BaseException:
                log.exception("worker %d crashed", worker_id)
            finally:
                os._exit(code)
        self.block.slot(index)[L.S_PID] = pid
        srv = self.cfg.server
        limit = srv.max_requests + random.randint(0, srv.max_requests_jitter) \
            if srv.max_requests else 0
        wp = WorkerProc(pid, index, worker_id, self.generation, self.system.monotonic(),
                        max_requests=limit)
        self.workers[pid] = wp
        for lst, sock in zip(self.listeners, socks, strict=True):
            lst.hold(sock, pid)
        self._publish_count()
        log.debug("spawned worker %d pid %d (slot %d)", worker_id, pid, index)
        return wp

    def _context_for(self, lst: Listener) -> ssl.SSLContext | None:
        """The TLS context a new worker serves `lst` with (None: plain). One
        context for a whole generation: its workers share the ticket keys."""
        if not lst.tls:
            return None
        assert self.tls is not None
        return self.tls.context

    def _in_child(self, keep: list[socket.socket]) -> None:
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.notify_fd >= 0:
            os.close(self.notify_fd)
        # Keep only this worker's sockets: a copy of another socket would keep
        # it open (and its queue unserved) after the master gives it up. The
        # steering programs' maps are the master's too.
        keep_fds = {s.fileno() for s in keep}
        for lst in self.listeners + self.removed:
            lst.close_in_child(keep_fds)
        gc.unfreeze()

    def _start_failed(self, worker_id: int, why: str) -> None:
        """Worker `worker_id` could not start (a socket or the fork failed, or it
        died at start): that id is tried again after a back-off, 0.1 s doubling
        to 10 s, the others are not held up. Once one has failed
        MAX_START_FAILURES times in a row with no worker serving, no worker can
        start: give up (exit 3)."""
        b = self.backoff.setdefault(worker_id, Backoff())
        b.failures += 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (b.failures - 1))
        b.until = self.system.monotonic() + delay
        if b.failures >= MAX_START_FAILURES and not self._any_accepting():
            log.error("no worker can start (%d tries); giving up. The worker's error: %s",
                      b.failures, why)
            self.exit_code = EXIT_NO_WORKER
            self.begin_stop(graceful=False)
        else:
            log.warning("worker failed at start (%s); next try in %.1f s (worker %d)",
                        why, delay, worker_id)

    # ------------------------------------------------------------ what the workers say
    def _reap(self) -> None:
        for pid, code in self.system.reap():
            w = self.workers.pop(pid, None)
            if w is not None:
                self._exited(w, code)

    def _exited(self, w: WorkerProc, code: int) -> None:
        assert self.block is not None
        text = self.block.read_text(w.slot)
        never_ready = self.block.slot(w.slot)[L.S_STATE] == L.STATE_STARTING
        # the per-IP connections it still counted (killed, or gone with them open),
        # before its slot can be taken again ([firewall] max_connections_per_ip)
        held = self.block.state.open.fold_conns(w.slot)
        if held:
            log.info("worker %d (pid %d) left %d per-IP connection counts; released",
                     w.worker_id, w.pid, held)
        # its counts per deployment kept, its outstanding requests dropped
        held = self.block.router.fold(w.slot)
        if held:
            log.info("worker %d (pid %d) left %d outstanding upstream requests; released",
                     w.worker_id, w.pid, held)
        self.block.fold(w.slot)
        self.system.forget(w.pid)
        for lst in self.listeners + self.removed:
            lst.release(w.pid)
        self._publish_count()
        was = w.state
        w.to(W.EXITED)
        if was in (W.HUNG, W.KILLED):
            log.error("worker %d (pid %d) killed after missing its heartbeat; it was %s",
                      w.worker_id, w.pid, w.stuck_on or text or "not answering SIGUSR2")
        elif was is W.DRAINING or self.phase is Phase.STOPPING:
            log.debug("worker %d pid %d exited (%d)", w.worker_id, w.pid, code)
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        log.warning("worker %d (pid %d) %s; replacing it", w.worker_id, w.pid, how)
        self.block.words[L.H_RESTARTS] += 1
        if self.phase is Phase.STARTING and w.generation == self.generation:
            self.move_to(Phase.FAILING)
        # Never ready (a hang in its setup included), or dead within START_GRACE.
        at_start = never_ready or self.system.monotonic() - w.started < START_GRACE
        if at_start and code != 0:
            self._start_failed(w.worker_id, text or how)

    def _observe(self) -> None:
        """STARTING -> SERVING once a worker's slot says READY. A worker id whose
        current-generation worker has served for START_GRACE starts its back-off over."""
        assert self.block is not None
        now = self.system.monotonic()
        for w in self.workers.values():
            if w.state is W.STARTING and self.block.slot(w.slot)[L.S_STATE] == L.STATE_READY:
                w.to(W.SERVING)
            if (self.backoff and w.accepting and w.generation == self.generation
                    and now - w.started >= START_GRACE):
                self.backoff.pop(w.worker_id, None)

    def _any_accepting(self) -> bool:
        return any(w.accepting for w in self.workers.values())

    def _check_heartbeats(self) -> None:
        """A worker whose loop has not stamped its slot for worker_timeout is
        asked where it is stuck (SIGUSR2: it logs the request and the stack,
        and writes the request into its slot), then killed and replaced."""
        assert self.block is not None
        limit_ms = int(self.cfg.server.worker_timeout * 1000)
        now = self.system.monotonic()
        now_ms = int(now * 1000)
        for w in self.workers.values():
            if w.hung:
                continue
            silent = now_ms - self.block.slot(w.slot)[L.S_HEARTBEAT]
            if silent > limit_ms:
                log.error("worker %d (pid %d) missed its heartbeat for %.1f s (worker_timeout "
                          "%g s); killing it", w.worker_id, w.pid, silent / 1000,
                          self.cfg.server.worker_timeout)
                self.block.write_text(w.slot, "")
                w.to(W.HUNG, deadline=now + DUMP_GRACE)
                self.system.kill(w.pid, signal.SIGUSR2)

    def _check_recycling(self) -> None:
        """max_requests (with jitter) and max_worker_rss_mb: SERVING -> RECYCLING;
        _maintain starts its replacement, then retires it."""
        assert self.block is not None
        srv = self.cfg.server
        for w in self.workers.values():
            if w.state is not W.SERVING or not w.max_requests:
                continue
            n = self.block.slot(w.slot)[L.S_REQUESTS]
            if n >= w.max_requests:
                w.to(W.RECYCLING, reason=f"served {n} requests (max_requests "
                                         f"{srv.max_requests} + jitter)")
        now = self.system.monotonic()
        if not srv.max_worker_rss_mb or now < self._next_rss_check:
            return
        self._next_rss_check = now + RSS_CHECK_EVERY
        limit = srv.max_worker_rss_mb * 1024 * 1024
        for w in self.workers.values():
            if w.state is not W.SERVING:
                continue
            rss = self.system.rss(w.pid)
            if rss is not None and rss > limit:
                w.to(W.RECYCLING, reason=f"RSS {rss / 1048576:.1f} MiB over max_worker_rss_mb "
                                         f"{srv.max_worker_rss_mb}")

    def _enforce_deadlines(self) -> None:
        """A HUNG worker is SIGKILLed once it has said where it is stuck, or at
        its deadline (DUMP_GRACE); a DRAINING one still there at its deadline."""
        assert self.block is not None
        now = self.system.monotonic()
        for w in self.workers.values():
            if w.state is W.HUNG:
                w.stuck_on = w.stuck_on or self.block.read_text(w.slot)
                if w.stuck_on or now > w.deadline:
                    self.system.kill(w.pid, signal.SIGKILL)
                    w.to(W.KILLED)   # _reap replaces it
            elif w.state is W.DRAINING and now > w.deadline:
                log.warning("worker %d (pid %d) did not exit in time; killing it",
                            w.worker_id, w.pid)
                self.system.kill(w.pid, signal.SIGKILL)
                w.to(W.DRAINING, deadline=now + KILL_AGAIN)

    # ------------------------------------------------------------ keeping the count
    def _current(self) -> list[WorkerProc]:
        """The current generation's workers not told to stop (HUNG and KILLED
        ones too: their replacement starts once they are reaped)."""
        return [w for w in self.workers.values()
                if w.generation == self.generation and w.state is not W.DRAINING]

    def _maintain(self) -> None:
        """Keep `target` current-generation workers; new ones start before old
        ones retire (reload, recycling), so the sockets are never unattended."""
        if self.phase is Phase.STOPPING:
            return
        self._spawn_missing()
        self._shrink_sockets()
        self._retire_extra()
        self._retire_recycled()
        if self.phase is not Phase.SERVING:
            self._hand_over()

    def _spawn_missing(self) -> None:
        """Fork a worker for every id 1..target that has none (a recycled one
        has none: its replacement starts beside it), but not for an id that is
        backing off after failing at start."""
        now = self.system.monotonic()
        have = {w.worker_id for w in self._current() if w.state is not W.RECYCLING}
        for wid in range(1, self.target + 1):
            if wid in have or (wid in self.backoff and now < self.backoff[wid].until):
                continue
            if self.spawn(wid) is None:
                break

    def _shrink_sockets(self) -> None:
        """Fewer workers (TTOU, reload): the sockets of the extra ones stop
        getting connections before their workers drain what is queued."""
        for lst in self.listeners:
            if len(lst.sockets) > self.target:
                try:
                    lst.shrink(self.target)
                except OSError as e:
                    self._steering_failed(e)

    def _retire_extra(self) -> None:
        """Workers past the target (TTOU, a reload with fewer), highest id first."""
        extra = [w for w in self._current() if w.running and w.worker_id > self.target]
        for w in sorted(extra, key=lambda w: -w.worker_id):
            self.retire(w)

    def _retire_recycled(self) -> None:
        """A RECYCLING worker retires once its replacement (same id) serves."""
        current = self._current()
        serving = {w.worker_id for w in current if w.state is W.SERVING}
        for w in current:
            if w.state is W.RECYCLING and w.worker_id in serving:
                log.info("worker %d (pid %d) recycled: %s", w.worker_id, w.pid, w.reason)
                self.retire(w)

    def _hand_over(self) -> None:
        """The newest generation serves once every worker id has a serving
        worker of it: the older generations retire, the addresses a reload
        removed close, and a reload noted meanwhile (HUP) runs now."""
        serving = {w.worker_id for w in self._current() if w.accepting}
        if not all(i in serving for i in range(1, self.target + 1)):
            return
        old = [w for w in self.workers.values()
               if w.generation != self.generation and w.running]
        for lst in self.removed:
            lst.refuse_all()
            lst.close()
        self.removed = []
        for w in old:
            self.retire(w)
        if old:
            log.info("reload: generation %d serving, %d old workers retiring",
                     self.generation, len(old))
        self.move_to(Phase.SERVING)
        if self.reload_pending:
            self.reload()

    def retire(self, w: WorkerProc) -> None:
        """Ask a worker to drain and exit; kill it if it overstays graceful_timeout."""
        w.to(W.DRAINING,
             deadline=self.system.monotonic() + self.cfg.server.graceful_timeout + KILL_GRACE)
        self.system.kill(w.pid, signal.SIGTERM)

    # ------------------------------------------------------------ steering
    def _steer(self) -> None:
        """New connections go only to sockets a serving worker is accepting on:
        a socket whose worker died waits for its replacement without new load,
        and one whose worker's heartbeat is late (a loop stuck, a process
        stopped) gets nothing new until the heartbeat comes back."""
        if not self.steering:
            return
        assert self.block is not None
        now_ms = int(self.system.monotonic() * 1000)
        accepting = [w for w in self.workers.values() if w.accepting]
        for w in accepting:
            age = now_ms - self.block.slot(w.slot)[L.S_HEARTBEAT]
            late = age > STEER_LATE_MS
            if late != w.late:
                w.late = late
                if late:
                    log.warning("worker %d (pid %d): no heartbeat for %.1f s; no new "
                                "connections until it is back", w.worker_id, w.pid, age / 1000)
                else:
                    log.info("worker %d (pid %d): heartbeat back; taking new connections",
                             w.worker_id, w.pid)
        # Every serving worker late at once is the machine stalling, not one
        # worker: keep steering to all of them rather than to none.
        chosen = [w for w in accepting if not w.late] or accepting
        steer_to = {w.worker_id - 1 for w in chosen}
        for lst in self.listeners:
            indices = sorted(i for i in steer_to if i < len(lst.sockets))
            if not indices:
                continue
            try:
                lst.steer(indices)
            except OSError as e:
                self._steering_failed(e)
                return

    def _steering_failed(self, e: OSError) -> None:
        log.warning("cannot steer connections between sockets (%s); a shrinking worker "
                    "count may reset queued connections", e.strerror)
        self.steering = False

    # ------------------------------------------------------------ signals to workers
    def _publish_count(self) -> None:
        if self.block is not None:
            self.block.words[L.H_WORKERS] = len(self.workers)

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.workers):
            self.system.kill(pid, sig)

    # ------------------------------------------------------------ stop, reload
    def begin_stop(self, graceful: bool) -> None:
        now = self.system.monotonic()
        if self.phase is Phase.STOPPING and graceful:
            return  # already stopping; a second TERM changes nothing
        wait = self.cfg.server.graceful_timeout + KILL_GRACE if graceful else QUICK_STOP_WAIT
        self.move_to(Phase.STOPPING)
        self.stop_deadline = now + wait
        log.info("%s stop requested", "graceful" if graceful else "quick")
        if graceful:
            # No new connections from now on; the workers serve what is queued
            # before they close their sockets, the last copies.
            for lst in self.listeners + self.removed:
                lst.refuse_all()
            self._close_listeners()
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        for w in self.workers.values():
            if w.running or w.state is W.DRAINING:
                w.to(W.DRAINING, deadline=self.stop_deadline)
            self.system.kill(w.pid, sig)

    def request_reload(self) -> None:
        """HUP. While the last reload's generation is still starting, reloading
        again would start a third generation beside it (a burst of HUPs filled
        every stats slot that way): note it instead, and reload once more, with
        the config as it is then, when that generation serves. The last config
        wins and none is lost (nginx, gunicorn). A generation whose workers die
        (FAILING) is not waited for: the new config may be the fix."""
        if self.phase is Phase.STARTING:
            if not self.reload_pending:
                log.info("HUP: generation %d is still starting; reloading again once it "
                         "serves", self.generation)
            self.reload_pending = True
            return
        self.reload()

    def reload(self) -> None:
        """Re-read the config and start a generation with it. Anything that goes
        wrong before the switch (a bad value, an address taken, a log file that
        cannot be opened, a bug) leaves the running generation serving with the
        running config, and is logged with its cause."""
        self.reload_pending = False
        path = self.cfg.path
        saved = (self.cfg, self.target, self.generation, self.listeners, self.removed,
                 self.phase, self.backoff, self.tls)
        opened: list[Listener] = []
        try:
            new = config_mod.load(path, self.overrides)
            # The certificate first: a bad one keeps the running generation, and
            # its context, serving.
            tls = tlsconfig.load(new, self.tls)
            opened = self._bind_new(new)
            self._switch(new, opened)
            self.tls = tls
            self._log_tls()
        except Exception as e:
            (self.cfg, self.target, self.generation, self.listeners, self.removed,
             self.phase, self.backoff, self.tls) = saved
            if self.block is not None:
                self.block.words[L.H_GENERATION] = self.generation
            for lst in opened:
                lst.close()
            expected = isinstance(e, (config_mod.ConfigError, BindError))
            log.error("reload refused, keeping the running configuration: %s",
                      e if expected else f"{type(e).__name__}: {e}", exc_info=not expected)

    def _bind_new(self, new: Config) -> list[Listener]:
        """Bind the addresses `new` adds (all or none)."""
        have = {lst.key for lst in self.listeners}
        opened: list[Listener] = []
        try:
            for key in _listen_keys(new):
                host, port, tls = key
                if (host, port, not tls) in have and port != 0:
                    # Old and new workers share a listener's sockets while the
                    # generations overlap: one socket cannot be plain for some
                    # and TLS for others.
                    raise BindError(
                        f"{describe(host, port)} moves from server."
                        f"{'bind' if tls else 'tls_bind'} to server."
                        f"{'tls_bind' if tls else 'bind'}: that takes a restart")
                if key not in have:
                    lst = Listener(host, port, new.server.backlog, tls)
                    opened.append(lst)
                    lst.ensure(min(new.worker_count, self._max_workers()))
        except BaseException:
            for lst in opened:
                lst.close()
            raise
        return opened

    def _switch(self, new: Config, opened: list[Listener]) -> None:
        """Start generation + 1 with `new`. What can fail comes first (the log
        file); removed addresses keep serving until the old workers retire."""
        old = self.cfg
        if (new.log.level, new.log.error_log) != (old.log.level, old.log.error_log):
            from .. import logs
            logs.setup_from(new)
        have = {lst.key: lst for lst in self.listeners}
        wanted = _listen_keys(new)
        # the router's records for the new deployments (may refuse: nothing changed yet)
        self._assign_router(new, self.generation + 1)
        self.removed = self.removed + [lst for key, lst in have.items() if key not in wanted]
        self.listeners = [have[k] for k in wanted if k in have] + opened
        self.cfg = new
        self.target = new.worker_count
        if not self._room_for(self.target, "reload: keeping fewer workers"):
            self.target = self._max_workers()
        self.generation += 1
        # The new config may fix what made workers fail: no back-off carried over.
        self.backoff = {}
        self.move_to(Phase.STARTING)
        assert self.block is not None
        self.block.words[L.H_GENERATION] = self.generation
        self.block.words[L.H_RELOADS] += 1
        self._publish_info()
        log.info("reloading %s: generation %d with %d workers on %s", new.path or "the defaults",
                 self.generation, self.target, ", ".join(lst.label for lst in self.listeners))

    def _assign_router(self, cfg: Config, generation: int) -> None:
        """Give each deployment and model of `cfg` its shared router record
        (shared/deployments.py) and each deployment its figure pair in the
        stats block: unchanged ones keep theirs."""
        assert self.block is not None
        model_fps, dep_fps = config_fingerprints(cfg.models)
        wanted = [(fp, KIND_MODEL) for fp in model_fps.values()]
        wanted += [(fp, KIND_DEPLOYMENT) for fp in dep_fps.values()]
        oldest = min((w.generation for w in self.workers.values()), default=generation)
        geo = self.block.geometry
        try:
            given = self.block.router.assign(wanted, generation, min(oldest, generation),
                                             geo.figure_pairs)
        except RouterStateFull as e:
            raise config_mod.ConfigError(f"{cfg.path or '<defaults>'}: {e}") from None
        # a deployment's figures start from zero, whatever held its pair before
        self.block.clear_models([m for p in given for m in geo.deployment_models(p)])

    def _max_workers(self) -> int:
        """Workers the block was sized for; it has two slots each, so a reload's
        new generation always finds room beside the old one."""
        assert self.block is not None
        return self.block.geometry.max_workers

    def reopen_logs(self) -> None:
        from ..logs import reopen
        reopen()
        log.info("USR1: log files reopened")
        for pid in self.workers:
            self.system.kill(pid, signal.SIGUSR1)

    # ------------------------------------------------------------ exit
    def _close_listeners(self) -> None:
        for lst in self.listeners + self.removed:
            lst.close()
        self.listeners = []
        self.removed = []

    def cleanup(self) -> None:
        """Runs however the master ends: unlink the block, drop the pid file."""
        self._close_listeners()
        if self.block is not None:
            self.block.unlink()
            self.block = None
        pidfile.remove(self.cfg.server.pid_file, self.pid)
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError as e:
                    if e.errno != errno.EBADF:
                        raise
            self._wake_r = self._wake_w = -1
        sys.stderr.flush()


def _listen_keys(cfg: Config) -> list[tuple[str, int, bool]]:
    """cfg's addresses as Listener.key matches them: (host, port, tls)."""
    return [(h, p, False) for h, p in cfg.binds] + [(h, p, True) for h, p in cfg.tls_binds]
