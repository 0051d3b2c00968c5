"""The master's supervision loop.

Signal handlers only record the signal (and wake the loop through the wakeup
fd); everything is done by the loop: spawning, reaping, heartbeats, stopping.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import select
import signal
import sys
import time
from dataclasses import dataclass, field

import orjson

from .. import config as config_mod
from .. import fdlimit
from ..config import Config
from ..stats import layout as L
from ..stats.block import BlockInUse, StatsBlock, block_name
from . import pidfile
from .sockets import BindError, Listener, open_listeners

log = logging.getLogger("neurohttp")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
LOOP_WAIT = 0.2
QUICK_STOP_WAIT = 3.0
# A worker that dies sooner than this after starting counts as failing at start.
START_GRACE = 1.0
MAX_START_FAILURES = 5
MAX_BACKOFF = 10.0
# After SIGUSR2 asks a hung worker where it is stuck, wait this long for its
# answer before SIGKILL.
DUMP_GRACE = 1.0
RSS_CHECK_EVERY = 1.0   # seconds between psutil RSS checks (max_worker_rss_mb)
EXIT_NO_WORKER = 3      # no worker could start (gunicorn's WORKER_BOOT_ERROR)


class StartupError(Exception):
    """The master cannot start; the message says why."""


def _monotonic_ms() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000


@dataclass
class WorkerProc:
    pid: int
    slot: int
    worker_id: int
    generation: int
    started: float = field(default_factory=time.monotonic)
    retiring: bool = False      # asked to drain (reload, TTOU, recycling)
    kill_at: float = 0.0        # SIGKILL deadline once retiring or stopping
    max_requests: int = 0       # recycle after this many requests (0: never)
    recycle: str = ""           # why it is to be replaced, once it is
    hung_since: float = 0.0     # heartbeat missed: SIGUSR2 sent at this time
    stuck_on: str = ""


class Master:
    def __init__(self, cfg: Config, overrides: dict | None = None, notify_fd: int = -1) -> None:
        self.cfg = cfg
        self.notify_fd = notify_fd   # --daemon: tell the waiting `start` how it went
        self.overrides = overrides or {}
        self.pid = os.getpid()
        self.started = time.time()
        self.block: StatsBlock | None = None
        self.listeners: list[Listener] = []
        self.removed: list[Listener] = []   # dropped by a reload; closed once old workers go
        self.workers: dict[int, WorkerProc] = {}
        self.target = cfg.worker_count
        self.generation = 1
        self.signals: list[int] = []
        self.stopping = 0.0          # deadline of a stop in progress; 0 when running
        self.start_failures = 0
        self.spawn_after = 0.0       # back-off after workers died at start
        self.last_worker_error = ""
        self.exit_code = 0
        self.steering = True         # False once the kernel refused a steering program
        self._next_rss_check = 0.0
        self._procs: dict[int, object] = {}   # pid -> psutil.Process, for RSS checks
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------ start
    def start(self) -> None:
        """Everything before the first fork; raises StartupError with a clear message."""
        cfg = self.cfg
        pid_path = cfg.server.pid_file
        running = pidfile.read(pid_path)
        if running and running != self.pid:
            raise StartupError(f"already running: master pid {running} (pid file {pid_path})")
        try:
            self.listeners = open_listeners(cfg.binds, self.target, cfg.server.backlog)
        except BindError as e:
            raise StartupError(str(e)) from None
        fdlimit.prepare(cfg.server.max_connections)  # before any fork: workers inherit it
        try:
            self.block = StatsBlock.create(block_name(pid_path),
                                           max(L.DEFAULT_WORKER_SLOTS, 4 * self.target))
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
        self._publish_info()
        try:
            from setproctitle import setproctitle
            setproctitle("neurohttpd: master" + (f" {cfg.path}" if cfg.path else ""))
        except ImportError:
            pass
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
                 ", ".join(lst.address for lst in self.listeners), self.target)

    def _publish_info(self) -> None:
        """Facts `neurohttpd status` shows that the counters do not hold."""
        assert self.block is not None
        self.block.write_text(0, orjson.dumps({
            "config": self.cfg.path, "pid_file": os.path.abspath(self.cfg.server.pid_file),
            "binds": [lst.address for lst in self.listeners], "target": self.target,
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
            self._handle_signals()
            self._reap()
            if self.stopping:
                if not self.workers:
                    break
                self._enforce_kill_deadlines()
                continue
            self._check_heartbeats()
            self._check_recycling()
            self._enforce_kill_deadlines()
            self._maintain()
            self._steer()

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

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                continue  # _reap runs every turn
            if sig == signal.SIGTERM:
                self.begin_stop(graceful=True)
            elif sig in (signal.SIGINT, signal.SIGQUIT):
                self.begin_stop(graceful=False)
            elif self.stopping:
                continue
            elif sig == signal.SIGHUP:
                self.reload()
            elif sig == signal.SIGUSR1:
                self.reopen_logs()
            elif sig == signal.SIGTTIN:
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

    # ------------------------------------------------------------ workers
    def spawn(self, worker_id: int) -> WorkerProc | None:
        assert self.block is not None
        index = self.block.reserve_slot(worker_id, self.generation)
        if index < 0:
            log.error("no free stats slot for worker %d", worker_id)
            return None
        for lst in self.listeners:
            lst.ensure(worker_id)
        socks = [lst.socket_for(worker_id - 1) for lst in self.listeners]
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                self._in_child(socks)
                from ..worker.worker import run_worker
                code = run_worker(self.cfg, self.block, index, worker_id, socks, self.pid)
            except BaseException:
                log.exception("worker %d crashed", worker_id)
            finally:
                os._exit(code)
        self.block.slot(index)[L.S_PID] = pid
        srv = self.cfg.server
        limit = srv.max_requests + random.randint(0, srv.max_requests_jitter) \
            if srv.max_requests else 0
        wp = WorkerProc(pid, index, worker_id, self.generation, max_requests=limit)
        self.workers[pid] = wp
        for lst, sock in zip(self.listeners, socks, strict=True):
            lst.hold(sock, pid)
        self._publish_count()
        log.debug("spawned worker %d pid %d (slot %d)", worker_id, pid, index)
        return wp

    def _in_child(self, keep: list) -> None:
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        # Keep only this worker's sockets: a copy of another socket would keep
        # it open (and its queue unserved) after the master gives it up.
        keep_fds = {s.fileno() for s in keep}
        for lst in self.listeners + self.removed:
            for s in lst.sockets:
                if s.fileno() not in keep_fds:
                    s.close()
        gc.unfreeze()

    def _current(self) -> list[WorkerProc]:
        return [w for w in self.workers.values()
                if not w.retiring and w.generation == self.generation]

    def _ready(self, w: WorkerProc) -> bool:
        assert self.block is not None
        return self.block.slot(w.slot)[L.S_STATE] == L.STATE_READY

    def _maintain(self) -> None:
        """Keep `target` current-generation workers; new ones start before old
        ones retire (reload, recycling), so the sockets are never unattended."""
        if self.stopping:
            return
        now = time.monotonic()
        current = self._current()
        staying = [w for w in current if not w.recycle]
        ids = {w.worker_id for w in staying}
        if len(ids) < self.target and now >= self.spawn_after:
            for wid in range(1, self.target + 1):
                if wid not in ids and self.spawn(wid) is None:
                    break
        # Fewer workers (TTOU, reload): the sockets of the extra ones stop
        # getting connections before their workers drain what is queued.
        for lst in self.listeners:
            if len(lst.sockets) > self.target:
                self._shrink(lst)
        extra = sorted((w for w in staying if w.worker_id > self.target),
                       key=lambda w: -w.worker_id)
        for w in extra:
            self.retire(w)
        # A worker to recycle retires once its replacement serves.
        for w in current:
            if w.recycle and any(o is not w and o.worker_id == w.worker_id and not o.recycle
                                 and self._ready(o) for o in current):
                log.info("worker %d (pid %d) recycled: %s", w.worker_id, w.pid, w.recycle)
                self.retire(w)
        # Old-generation workers retire once the new generation is serving.
        old = [w for w in self.workers.values()
               if w.generation != self.generation and not w.retiring]
        staying = [w for w in self._current() if not w.recycle]
        if old and staying and all(self._ready(w) for w in staying) \
                and len(staying) >= self.target:
            for lst in self.removed:
                lst.refuse_all()
                lst.close()
            self.removed = []
            for w in old:
                self.retire(w)
            log.info("reload: generation %d serving, %d old workers retiring",
                     self.generation, len(old))

    def _shrink(self, lst: Listener) -> None:
        try:
            lst.shrink(self.target)
        except OSError as e:
            self._steering_failed(e)

    def _steer(self) -> None:
        """New connections go only to sockets a ready worker is accepting on: a
        socket whose worker died waits for its replacement without new load."""
        if not self.steering:
            return
        ready = {w.worker_id - 1 for w in self.workers.values() if self._ready(w)}
        for lst in self.listeners:
            indices = sorted(i for i in ready if i < len(lst.sockets))
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

    def retire(self, w: WorkerProc) -> None:
        """Ask a worker to drain and exit; kill it if it overstays graceful_timeout."""
        w.retiring = True
        w.kill_at = time.monotonic() + self.cfg.server.graceful_timeout + 5.0
        self._signal(w.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self._exited(w, os.waitstatus_to_exitcode(status))

    def _exited(self, w: WorkerProc, code: int) -> None:
        assert self.block is not None
        text = self.block.read_text(w.slot)
        self.block.fold(w.slot)
        self._procs.pop(w.pid, None)
        for lst in self.listeners + self.removed:
            lst.release(w.pid)
        self._publish_count()
        if w.hung_since:
            log.error("worker %d (pid %d) killed after missing its heartbeat; it was %s",
                      w.worker_id, w.pid, w.stuck_on or text or "not answering SIGUSR2")
        if (w.retiring or self.stopping) and not w.hung_since:
            log.debug("worker %d pid %d exited (%d)", w.worker_id, w.pid, code)
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        log.warning("worker %d (pid %d) %s; replacing it", w.worker_id, w.pid, how)
        self.block.words[L.H_RESTARTS] += 1
        if time.monotonic() - w.started < START_GRACE and code != 0:
            if text:
                self.last_worker_error = text
            self.start_failures += 1
            delay = min(MAX_BACKOFF, 0.1 * 2 ** (self.start_failures - 1))
            self.spawn_after = time.monotonic() + delay
            if self.start_failures >= MAX_START_FAILURES and not self._any_ready():
                log.error("no worker can start (%d tries); giving up. The worker's error: %s",
                          self.start_failures, self.last_worker_error or how)
                self.exit_code = EXIT_NO_WORKER
                self.begin_stop(graceful=False)
            else:
                log.warning("worker failed at start (%s); next try in %.1f s",
                            self.last_worker_error or how, delay)
        else:
            self.start_failures = 0

    def _any_ready(self) -> bool:
        return any(self._ready(w) for w in self.workers.values())

    def _check_heartbeats(self) -> None:
        """A worker whose loop has not stamped its slot for worker_timeout is
        asked where it is stuck (SIGUSR2: it logs the request and the stack,
        and writes the request into its slot), then killed and replaced."""
        assert self.block is not None
        limit_ms = int(self.cfg.server.worker_timeout * 1000)
        now_ms = _monotonic_ms()
        now = time.monotonic()
        for w in list(self.workers.values()):
            slot = self.block.slot(w.slot)
            if w.hung_since:
                w.stuck_on = w.stuck_on or self.block.read_text(w.slot)
                if (w.stuck_on or now - w.hung_since > DUMP_GRACE) and w.kill_at != -1:
                    self._signal(w.pid, signal.SIGKILL)
                    w.kill_at = -1  # killed; _reap replaces it
                continue
            if slot[L.S_STATE] == L.STATE_FREE:
                continue
            silent = now_ms - slot[L.S_HEARTBEAT]
            if silent > limit_ms:
                log.error("worker %d (pid %d) missed its heartbeat for %.1f s (worker_timeout "
                          "%g s); killing it", w.worker_id, w.pid, silent / 1000,
                          self.cfg.server.worker_timeout)
                self.block.write_text(w.slot, "")
                w.hung_since = now
                self._signal(w.pid, signal.SIGUSR2)

    def _check_recycling(self) -> None:
        """max_requests (with jitter) and max_worker_rss_mb: mark the worker;
        _maintain starts its replacement, then retires it."""
        assert self.block is not None
        srv = self.cfg.server
        for w in self.workers.values():
            if w.retiring or w.recycle or not w.max_requests:
                continue
            n = self.block.slot(w.slot)[L.S_REQUESTS]
            if n >= w.max_requests:
                w.recycle = f"served {n} requests (max_requests {srv.max_requests} + jitter)"
        now = time.monotonic()
        if not srv.max_worker_rss_mb or now < self._next_rss_check:
            return
        self._next_rss_check = now + RSS_CHECK_EVERY
        import psutil
        limit = srv.max_worker_rss_mb * 1024 * 1024
        for w in self.workers.values():
            if w.retiring or w.recycle:
                continue
            try:
                proc = self._procs.get(w.pid)
                if proc is None:
                    proc = self._procs[w.pid] = psutil.Process(w.pid)
                rss = proc.memory_info().rss  # type: ignore[attr-defined]
            except psutil.Error:
                continue
            if rss > limit:
                w.recycle = (f"RSS {rss / 1048576:.1f} MiB over max_worker_rss_mb "
                             f"{srv.max_worker_rss_mb}")

    def _enforce_kill_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.kill_at > 0 and now > w.kill_at:
                log.warning("worker %d (pid %d) did not exit in time; killing it",
                            w.worker_id, w.pid)
                self._signal(w.pid, signal.SIGKILL)
                w.kill_at = now + 5.0

    def _publish_count(self) -> None:
        if self.block is not None:
            self.block.words[L.H_WORKERS] = len(self.workers)

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.workers):
            self._signal(pid, sig)

    # ------------------------------------------------------------ stop, reload
    def begin_stop(self, graceful: bool) -> None:
        now = time.monotonic()
        if self.stopping and graceful:
            return  # already stopping; a second TERM changes nothing
        wait = self.cfg.server.graceful_timeout + 5.0 if graceful else QUICK_STOP_WAIT
        self.stopping = now + wait
        log.info("%s stop requested", "graceful" if graceful else "quick")
        if graceful:
            # No new connections from now on; the workers serve what is queued
            # before they close their sockets, the last copies.
            for lst in self.listeners + self.removed:
                lst.refuse_all()
            self._close_listeners()
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        for w in self.workers.values():
            w.kill_at = self.stopping
            self._signal(w.pid, sig)

    def reload(self) -> None:
        """Re-read the config; keep the running one if the new one is bad."""
        path = self.cfg.path
        try:
            new = config_mod.load(path, self.overrides)
        except config_mod.ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        try:
            self._apply_binds(new)
        except BindError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        old = self.cfg
        self.cfg = new
        if (new.log.level, new.log.error_log) != (old.log.level, old.log.error_log):
            from .. import logs
            logs.setup(new.log.level, new.log.error_log)
        self.target = new.worker_count
        self.generation += 1
        self.start_failures = 0
        assert self.block is not None
        self.block.words[L.H_GENERATION] = self.generation
        self.block.words[L.H_RELOADS] += 1
        self._publish_info()
        log.info("reloading %s: generation %d with %d workers on %s", path or "the defaults",
                 self.generation, self.target, ", ".join(lst.address for lst in self.listeners))

    def _apply_binds(self, new: Config) -> None:
        """Bind the new addresses now (all or none); the removed ones keep
        serving until the old workers retire, then close."""
        wanted = new.binds
        have = {(lst.host, lst.requested_port): lst for lst in self.listeners}
        opened: list[Listener] = []
        try:
            for key in wanted:
                if key not in have:
                    lst = Listener(key[0], key[1], new.server.backlog)
                    lst.ensure(new.worker_count)
                    opened.append(lst)
        except BindError:
            for lst in opened:
                lst.close()
            raise
        removed = [lst for key, lst in have.items() if key not in set(wanted)]
        self.listeners = [have[k] for k in wanted if k in have] + opened
        self.removed += removed

    def reopen_logs(self) -> None:
        from ..logs import reopen
        reopen()
        log.info("USR1: log files reopened")
        for pid in self.workers:
            self._signal(pid, signal.SIGUSR1)

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
