"""The master's supervision loop.

Signal handlers only record the signal (and wake the loop through the wakeup
fd); everything is done by the loop: spawning, reaping, heartbeats, stopping.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field

from .. import config as config_mod
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


class Master:
    def __init__(self, cfg: Config, overrides: dict | None = None, notify_fd: int = -1) -> None:
        self.cfg = cfg
        self.notify_fd = notify_fd   # --daemon: tell the waiting `start` how it went
        self.overrides = overrides or {}
        self.pid = os.getpid()
        self.block: StatsBlock | None = None
        self.listeners: list[Listener] = []
        self.workers: dict[int, WorkerProc] = {}
        self.target = cfg.worker_count
        self.generation = 1
        self.signals: list[int] = []
        self.stopping = 0.0          # deadline of a stop in progress; 0 when running
        self.stop_signal = 0
        self.start_failures = 0
        self.spawn_after = 0.0       # back-off after workers died at start
        self.last_worker_error = ""
        self.exit_code = 0
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
            self.cleanup()
            raise StartupError(f"cannot write pid file {pid_path}: {e.strerror}") from None
        self.block.words[L.H_GENERATION] = self.generation
        try:
            from setproctitle import setproctitle
            setproctitle("neurohttpd: master" + (f" {cfg.path}" if cfg.path else ""))
        except ImportError:
            pass
        # Load what every worker needs once, before forking, so its pages are shared.
        from ..ai import tokenizer
        tokenizer.preload()
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
            self.start()
        except StartupError as e:
            log.error("%s", e)
            self._notify(f"error {e}")
            return 1
        except BaseException as e:
            self._notify(f"error {e!r}")
            raise
        self._notify(f"ok {self.pid}")
        try:
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
                self._enforce_kill_deadlines()
                self._maintain()
        except Exception:
            log.exception("master failed")
            self.exit_code = 1
            self._kill_all(signal.SIGKILL)
        finally:
            self.cleanup()
        log.info("neurohttpd master %d exiting (%d)", self.pid, self.exit_code)
        return self.exit_code

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
            elif sig == signal.SIGHUP:
                self.reload()
            elif sig == signal.SIGUSR1:
                self.reopen_logs()
            elif sig == signal.SIGTTIN:
                self.target += 1
                log.info("TTIN: %d workers", self.target)
            elif sig == signal.SIGTTOU:
                if self.target > 1:
                    self.target -= 1
                    log.info("TTOU: %d workers", self.target)

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
        wp = WorkerProc(pid, index, worker_id, self.generation)
        self.workers[pid] = wp
        self._publish_count()
        log.debug("spawned worker %d pid %d (slot %d)", worker_id, pid, index)
        return wp

    def _in_child(self, keep: list) -> None:
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        keep_fds = {s.fileno() for s in keep}
        for lst in self.listeners:
            for s in lst.sockets:
                if s.fileno() not in keep_fds:
                    s.close()
        gc.unfreeze()

    def _live_ids(self) -> set[int]:
        return {w.worker_id for w in self.workers.values()
                if not w.retiring and w.generation == self.generation}

    def _maintain(self) -> None:
        """Keep `target` current-generation workers running, retire extras."""
        if self.stopping:
            return
        now = time.monotonic()
        current = [w for w in self.workers.values()
                   if not w.retiring and w.generation == self.generation]
        ids = {w.worker_id for w in current}
        if len(current) < self.target and now >= self.spawn_after:
            for wid in range(1, self.target + 1):
                if wid not in ids:
                    if self.spawn(wid) is None:
                        break
        elif len(current) > self.target:
            for w in sorted(current, key=lambda w: -w.worker_id)[:len(current) - self.target]:
                self.retire(w)
        # Old-generation workers retire once the new generation is serving.
        if any(w.generation != self.generation and not w.retiring for w in self.workers.values()):
            assert self.block is not None
            ready = sum(1 for w in current
                        if self.block.slot(w.slot)[L.S_STATE] == L.STATE_READY)
            if ready >= min(self.target, len(current)) and current:
                for w in list(self.workers.values()):
                    if w.generation != self.generation and not w.retiring:
                        self.retire(w)

    def retire(self, w: WorkerProc) -> None:
        """Ask a worker to drain and exit; kill it if it overstays graceful_timeout."""
        w.retiring = True
        w.kill_at = time.monotonic() + self.cfg.server.graceful_timeout + 1.0
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
            assert self.block is not None
            self.block.fold(w.slot)
            self._publish_count()
            code = os.waitstatus_to_exitcode(status)
            if w.retiring or self.stopping:
                log.debug("worker %d pid %d exited (%d)", w.worker_id, pid, code)
                continue
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            log.warning("worker %d (pid %d) %s; replacing it", w.worker_id, pid, how)
            self.block.words[L.H_RESTARTS] += 1
            if time.monotonic() - w.started < START_GRACE and code != 0:
                self.start_failures += 1
                delay = min(10.0, 0.1 * 2 ** (self.start_failures - 1))
                self.spawn_after = time.monotonic() + delay
                if self.start_failures >= MAX_START_FAILURES and not self._any_ready():
                    log.error("workers keep dying at start (%d times); giving up",
                              self.start_failures)
                    self.exit_code = 3
                    self.begin_stop(graceful=False)
            else:
                self.start_failures = 0

    def _any_ready(self) -> bool:
        assert self.block is not None
        return any(self.block.slot(w.slot)[L.S_STATE] == L.STATE_READY
                   for w in self.workers.values())

    def _check_heartbeats(self) -> None:
        assert self.block is not None
        limit_ms = int(self.cfg.server.worker_timeout * 1000)
        now_ms = _monotonic_ms()
        for w in list(self.workers.values()):
            slot = self.block.slot(w.slot)
            if slot[L.S_STATE] != L.STATE_READY:
                continue
            if now_ms - slot[L.S_HEARTBEAT] > limit_ms:
                log.error("worker %d (pid %d) missed its heartbeat for %.1f s; killing it",
                          w.worker_id, w.pid, (now_ms - slot[L.S_HEARTBEAT]) / 1000)
                self._signal(w.pid, signal.SIGKILL)

    def _enforce_kill_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.kill_at and now > w.kill_at:
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
        wait = self.cfg.server.graceful_timeout + 1.0 if graceful else QUICK_STOP_WAIT
        self.stopping = now + wait
        log.info("%s stop requested", "graceful" if graceful else "quick")
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
        self.cfg = new
        self.target = new.worker_count
        self.generation += 1
        assert self.block is not None
        self.block.words[L.H_GENERATION] = self.generation
        self.block.words[L.H_RELOADS] += 1
        log.info("reloading: generation %d with %d workers", self.generation, self.target)

    def _apply_binds(self, new: Config) -> None:
        wanted = new.binds
        have = {(lst.host, lst.port): lst for lst in self.listeners}
        opened: list[Listener] = []
        try:
            for host, port in wanted:
                if (host, port) not in have and port != 0:
                    lst = Listener(host, port, new.server.backlog)
                    lst.ensure(new.worker_count)
                    opened.append(lst)
        except BindError:
            for lst in opened:
                lst.close()
            raise
        keep = [have[(h, p)] for h, p in wanted if (h, p) in have]
        removed = [lst for key, lst in have.items() if key not in set(wanted)]
        self.listeners = keep + opened
        # Sockets of removed addresses close once their old workers are gone;
        # the master's copy can close now.
        for lst in removed:
            lst.close()

    def reopen_logs(self) -> None:
        from ..logs import reopen
        reopen()
        for pid in self.workers:
            self._signal(pid, signal.SIGUSR1)

    # ------------------------------------------------------------ exit
    def _close_listeners(self) -> None:
        for lst in self.listeners:
            lst.close()
        self.listeners = []

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
