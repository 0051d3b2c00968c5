"""What a pool is told: its timeouts and bounds, and the TLS context for https."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. The DESIGN.md deployment keys map to the first three fields.

    connect     TCP connect plus TLS handshake (connect_timeout_s)
    first_byte  from the request's last byte sent to the response's first byte
                (first_byte_timeout_s)
    idle        between two reads of the response once it has begun, and
                while the upstream takes none of a streamed request body
                (idle_timeout_s: "between stream events")
    total       the whole exchange: pool wait, connect, upload, head and body;
                0 means no bound
    pool        waiting for a free connection when max_connections are busy
    """

    connect: float = 3.0
    first_byte: float = 60.0
    idle: float = 30.0
    total: float = 0.0
    pool: float = 10.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "idle", "pool"):
            if not getattr(self, name) > 0:
                raise ValueError(f"timeout {name} must be > 0")
        if self.total < 0:
            raise ValueError("timeout total must be >= 0 (0: none)")


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """max_connections   connections per origin and worker, idle and busy together
    keepalive_s         an idle pooled connection is closed after this long
    max_head_bytes      a response head larger than this is a protocol error
    """

    max_connections: int = 64
    keepalive_s: float = 15.0
    max_head_bytes: int = 65536

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not self.keepalive_s > 0:
            raise ValueError("keepalive_s must be > 0")
        if self.max_head_bytes < 1024:
            raise ValueError("max_head_bytes must be >= 1024")


DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_LIMITS = PoolLimits()


@lru_cache(maxsize=16)
def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's CA store, or only `ca_file`'s
    CAs (a private upstream); hostname checked; TLS 1.2+; ALPN http/1.1.
    One per CA file per process: loading the CA store is slow."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
