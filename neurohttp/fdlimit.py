"""The open-file limit (RLIMIT_NOFILE) and what it allows a worker.

Every client connection is a file descriptor. With the common default soft
limit of 1024 and `max_connections = 10000`, a full worker could only fail
accept() with EMFILE. So the master raises the soft limit to the hard one
before it forks (workers inherit it, as nginx's worker_rlimit_nofile does),
and each worker takes at most what the limit leaves after a reserve for its
own descriptors: listeners, logs, the event loop, upstream pools, plugins.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("neurohttp")

# Descriptors a worker keeps besides its client connections; a worker that runs
# short anyway refuses new connections with 503 (worker/acceptor.py).
FD_RESERVE = 64


def _ceiling() -> int:
    """The most the kernel lets a process open (fs.nr_open), for an infinite hard limit."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _ceiling() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, want
    return soft, soft


def connection_cap(max_connections: int) -> int:
    """max_connections, or fewer when the open-file limit does not allow it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


def prepare(max_connections: int) -> None:
    """At the master's start, before the first fork: raise the limit, and say once
    what it leaves each worker if that is less than max_connections."""
    before, after = raise_limit()
    if after != before:
        log.info("open-file limit (RLIMIT_NOFILE) raised from %d to %d", before, after)
    cap = connection_cap(max_connections)
    if cap < max_connections:
        log.warning("max_connections = %d is more than the open-file limit (RLIMIT_NOFILE %d) "
                    "allows: each worker takes at most %d connections, then answers 503 "
                    "(raise the hard limit: ulimit -Hn, or LimitNOFILE= under systemd)",
                    max_connections, after, cap)
