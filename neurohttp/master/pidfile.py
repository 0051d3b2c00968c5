"""The pid file: how `neurohttpd stop/reload/status` find the master.

A pid file outlives a master that was killed, and its pid may since belong to
another process. It is believed only when that process carries the master's
title (psutil); otherwise it is stale: reported, never signalled, and replaced
by the next `start`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

MASTER_TITLE = "neurohttpd: master"


@dataclass(frozen=True)
class Found:
    """What a pid file names: `pid` (None: no readable pid), whether that is a
    running neurohttpd master, and if not, why the file is stale."""

    pid: int | None
    master: bool
    stale: str = ""


def is_master(pid: int) -> tuple[bool, str]:
    """(True, "") if `pid` is a live neurohttpd master, else (False, why not)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False, f"pid {pid} is not running"
        argv = proc.cmdline()
        cmdline = " ".join(argv).strip() or proc.name()
    except psutil.NoSuchProcess:
        return False, f"pid {pid} is not running"
    except psutil.AccessDenied:
        return True, ""  # another user's process we may not inspect: cannot tell
    if cmdline.startswith(MASTER_TITLE) or _started_as_master(argv):
        return True, ""
    shown = cmdline if len(cmdline) <= 60 else cmdline[:57] + "..."
    return False, f"pid {pid} is {shown!r}, not a neurohttpd master"


def _started_as_master(argv: list[str]) -> bool:
    """`neurohttpd start ...` or `python -m neurohttp start ...` before (or
    without) setproctitle."""
    for i, arg in enumerate(argv[:-1]):
        if (os.path.basename(arg) == "neurohttpd" or
                (arg == "neurohttp" and i > 0 and argv[i - 1] == "-m")):
            return argv[i + 1] == "start"
    return False


def inspect(path: str) -> Found:
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return Found(None, False)
    if pid <= 0:
        return Found(None, False)
    master, why = is_master(pid)
    return Found(pid, master, why)


def read(path: str) -> int | None:
    """The pid in `path` if that process is a running neurohttpd master, else None."""
    found = inspect(path)
    return found.pid if found.master else None


def write(path: str, pid: int) -> None:
    """Write atomically, so a reader never sees a half-written file."""
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def remove(path: str, pid: int) -> None:
    """Remove `path` if it still names `pid` (a newer master may have replaced it)."""
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) != pid:
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass
