"""The operating-system calls the master's loop makes about its workers: fork,
signal, reap, the clock, a worker's RSS. They are here, in one small object,
so that the loop's decisions can be driven in tests with a fake process table
(tests/test_arbiter.py), as gunicorn's arbiter tests do, and without forking.
"""

from __future__ import annotations

import os
import time

import psutil


class System:
    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}   # kept: psutil reads /proc through them

    def fork(self) -> int:
        """os.fork(): 0 in the child. OSError (EAGAIN, ENOMEM) when it cannot."""
        return os.fork()

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> list[tuple[int, int]]:
        """(pid, exit code) of every child that has exited; a negative code is
        the signal that killed it."""
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                break
            out.append((pid, os.waitstatus_to_exitcode(status)))
        return out

    def monotonic(self) -> float:
        """CLOCK_MONOTONIC seconds: the clock the workers stamp their heartbeats with."""
        return time.monotonic()

    def rss(self, pid: int) -> int | None:
        """Resident memory of a worker in bytes; None if it cannot be read."""
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            return proc.memory_info().rss
        except psutil.Error:
            return None

    def forget(self, pid: int) -> None:
        """A worker was reaped: drop what is held for it."""
        self._procs.pop(pid, None)
