"""The pid file: how `neurohttpd stop/reload/status` find the master."""

from __future__ import annotations

import os

from ..stats.block import pid_alive


def read(path: str) -> int | None:
    """The pid in `path` if that process is alive, else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


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
