"""CPU, memory and open files of the master and the workers (psutil), by pid."""

from __future__ import annotations

from typing import Any

import psutil


def process_figures(pid: int) -> dict[str, Any] | None:
    """{"cpu_seconds", "rss_bytes", "open_fds"} of `pid`; None if it is gone."""
    if pid <= 0:
        return None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return {"cpu_seconds": round(cpu.user + cpu.system, 3),
                    "rss_bytes": p.memory_info().rss,
                    "open_fds": p.num_fds()}
    except (psutil.Error, OSError):
        return None
