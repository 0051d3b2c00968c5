"""Upstream errors: one exception type whose `kind` says what went wrong.

The router maps kinds to retries and status codes, so a kind says *where* a
request failed as much as *what* failed:

    kind                     raised when                                   a response byte was received
    connect                  TCP connect refused/unreachable, DNS failure  no
    tls                      TLS handshake failed, bad certificate/host    no
    connect_timeout          no TCP+TLS connection within connect_timeout  no
    pool_timeout             no free pooled connection within pool_timeout no
    first_byte_timeout       request sent, no response byte in time        no
    idle_timeout             no body bytes (or the upstream took none of   yes (or no, while sending)
                             our request body) for idle_timeout
    total_timeout            the whole exchange passed its total bound     either
    closed                   the upstream closed before any response byte  no
    closed_mid_response      closed after the response began, before its end  yes
    protocol                 the upstream's bytes are not valid HTTP/1.1   yes
    status                   Response.raise_for_status on a 4xx/5xx        yes

Messages name the origin (scheme://host:port) and never a header, a target
or a body: an API key can be in any of those, and errors end up in logs.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    CONNECT = "connect"
    TLS = "tls"
    CONNECT_TIMEOUT = "connect_timeout"
    POOL_TIMEOUT = "pool_timeout"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    TOTAL_TIMEOUT = "total_timeout"
    CLOSED = "closed"
    CLOSED_MID_RESPONSE = "closed_mid_response"
    PROTOCOL = "protocol"
    STATUS = "status"


# Kinds after which the upstream has seen no complete request: safe to retry
# even a non-idempotent request (the router uses this with its own budget).
NOT_SENT = frozenset({ErrorKind.CONNECT, ErrorKind.TLS, ErrorKind.CONNECT_TIMEOUT,
                      ErrorKind.POOL_TIMEOUT})
TIMEOUTS = frozenset({ErrorKind.CONNECT_TIMEOUT, ErrorKind.POOL_TIMEOUT,
                      ErrorKind.FIRST_BYTE_TIMEOUT, ErrorKind.IDLE_TIMEOUT,
                      ErrorKind.TOTAL_TIMEOUT})


class UpstreamError(Exception):
    """A failed upstream exchange.

    kind              an ErrorKind
    origin            "scheme://host:port" of the upstream ("" when unknown)
    response_started  a byte of the response had been received
    status            the HTTP status (kind "status"), else 0
    retry_after       seconds from the upstream's Retry-After (kind "status"), else None
    """

    def __init__(self, kind: ErrorKind, message: str, *, origin: str = "",
                 response_started: bool = False, status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{origin}: {message}" if origin else message)
        self.kind = kind
        self.message = message
        self.origin = origin
        self.response_started = response_started
        self.status = status
        self.retry_after = retry_after

    @property
    def timeout(self) -> bool:
        return self.kind in TIMEOUTS

