"""CPU, memory and open files of the master and the workers, by pid.

The worker answering /stats reads these for every process. It keeps each
process's /proc/<pid>/stat open and rereads it (pread), and counts open files
with stat() (Linux 6.2+ gives the count as the size of /proc/<pid>/fd), so
the figures need no new file descriptor. Under a connection flood a worker
sits at its descriptor limit and can open nothing: psutil then failed and
/stats had no figures at all, which the dashboard drew as 0% CPU while
`neurohttpd status`, another process, saw the workers busy.
"""

from __future__ import annotations

import os
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _Proc:
    """One process's open /proc/<pid>/stat, and its last open-file count."""

    __slots__ = ("fd", "open_fds")

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        self.open_fds = 0

    def read(self) -> bytes:
        # A held fd reads its own process: once it has exited (even if the pid
        # number is reused) the read fails with ESRCH.
        return os.pread(self.fd, 4096, 0)

    def close(self) -> None:
        os.close(self.fd)


_procs: dict[int, _Proc] = {}


def _forget(pid: int) -> None:
    proc = _procs.pop(pid, None)
    if proc is not None:
        proc.close()


def _open(pid: int) -> _Proc:
    # A new pid (a worker was replaced): drop the processes that are gone.
    for old in list(_procs):
        try:
            _procs[old].read()
        except OSError:
            _forget(old)
    proc = _procs[pid] = _Proc(pid)
    return proc


def _count_fds(pid: int, proc: _Proc) -> int:
    """Open files of `pid`; the last count when they cannot be counted now."""
    try:
        n = os.stat(f"/proc/{pid}/fd").st_size
        if n <= 0:  # before Linux 6.2 the size is 0: list the directory
            n = len(os.listdir(f"/proc/{pid}/fd"))
        proc.open_fds = n
    except OSError:
        pass
    return proc.open_fds


def process_figures(pid: int) -> dict[str, Any] | None:
    """{"cpu_seconds", "rss_bytes", "open_fds"} of `pid`; None if it is gone."""
    if pid <= 0:
        return None
    try:
        proc = _procs.get(pid) or _open(pid)
        try:
            stat = proc.read()
        except OSError:
            _forget(pid)  # exited; a process reusing the pid is opened afresh
            proc = _open(pid)
            stat = proc.read()
    except OSError:
        return None
    # The fields after "(comm)": state is field 3, utime 14, stime 15, rss 24 (pages).
    fields = stat.rsplit(b")", 1)[1].split()
    return {"cpu_seconds": round((int(fields[11]) + int(fields[12])) / _TICKS, 3),
            "rss_bytes": int(fields[21]) * _PAGE,
            "open_fds": _count_fds(pid, proc)}
