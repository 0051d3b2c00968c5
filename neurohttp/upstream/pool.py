"""A pool of keep-alive connections to one origin, inside the worker's loop.

Rules:
- At most `max_connections` connections (idle, busy and connecting together).
- Idle connections are reused last-in first-out: the most recently used one is
  the likeliest to be alive and warm, and the oldest age out.
- At the bound a request waits, first come first served, for a connection
  given back or a slot freed, up to `timeouts.pool` (kind "pool_timeout");
  waits and wait timeouts are counted.
- An idle connection is closed after `keepalive_s`; one the upstream closes
  (EOF or reset seen while idle) leaves the pool at once.
- Retry rule: a request that fails with kind "closed" (the connection closed
  before any response byte) on a *reused* connection is sent again, once, on
  a new connection, when its body can be sent again (bytes, or a streamed
  body nothing was taken from yet). The upstream closed an idle keep-alive
  connection as we sent on it: it never saw a complete request, or closed
  without answering, so repeating even a POST is safe. A fresh connection
  that closes unanswered is not retried: that is the upstream's answer.
- DNS: a host name is resolved by the loop's getaddrinfo (uvloop and asyncio
  run it off the loop's thread) on each new connection; IP literals are not
  resolved.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable, Mapping
from typing import Any

from .connection import UpstreamConnection
from .errors import ErrorKind, UpstreamError
from .h1_client import HeaderBlock, check_method, check_target, request_head, request_line
from .origin import Origin
from .response import Response
from .settings import DEFAULT_LIMITS, DEFAULT_TIMEOUTS, PoolLimits, Timeouts, tls_context

Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None
Headers = HeaderBlock | Mapping[str, str] | Iterable[tuple[str, str]] | None


class Pool:
    """Connections to one origin. `request()` is what providers and plugins call."""

    def __init__(self, origin: Origin, limits: PoolLimits = DEFAULT_LIMITS,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS, ca_file: str | None = None) -> None:
        self.origin = origin
        self.name = str(origin)
        self.limits = limits
        self.timeouts = timeouts
        self.ca_file = ca_file
        self._ssl: ssl.SSLContext | None = tls_context(ca_file) if origin.tls else None
        self._host = origin.host_header
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[UpstreamConnection] = []   # oldest first; reuse pops the newest
        self._conns: set[UpstreamConnection] = set()
        self._count = 0          # connections open or being opened (the bound's count)
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._lines: dict[tuple[str, str | bytes], bytes] = {}
        # counters (since the pool was made)
        self.requests = 0
        self.connects = 0
        self.connect_errors = 0
        self.reuses = 0
        self.stale_retries = 0
        self.waits = 0
        self.wait_timeouts = 0
        self.idle_expired = 0
        self.closed_while_idle = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def __repr__(self) -> str:
        return (f"<Pool {self.name} open={self._count} idle={len(self._idle)} "
                f"waiting={len(self._waiters)}>")

    def stats(self) -> dict[str, Any]:
        return {"origin": self.name, "open": self._count, "idle": len(self._idle),
                "busy": self._count - len(self._idle), "waiting": len(self._waiters),
                "max_connections": self.limits.max_connections, "requests": self.requests,
                "connects": self.connects, "connect_errors": self.connect_errors,
                "reuses": self.reuses, "stale_retries": self.stale_retries,
                "waits": self.waits, "wait_timeouts": self.wait_timeouts,
                "idle_expired": self.idle_expired, "closed_while_idle": self.closed_while_idle}

    # ------------------------------------------------------------ requests
    async def request(self, method: str, target: str | bytes, *, headers: Headers = None,
                      body: Body = None, timeouts: Timeouts | None = None,
                      length: int | None = None) -> Response:
        """Send a request, return the Response once its head has arrived.

        target   origin-form: "/v1/chat/completions?x=1"
        headers  a HeaderBlock (build one per deployment: it is checked once) or
                 a mapping / pairs; Host, framing and connection fields are ours
        body     bytes (Content-Length), an async iterator of chunks (chunked,
                 sent with back-pressure), or None (no body)
        length   with an async iterator: its total size, sent as Content-Length
                 with the pieces unframed (an iterator that yields more or less
                 than that fails the request with ValueError)
        timeouts per-request override of the pool's Timeouts

        Use the response with `async with`, or read it to its end, or close it.
        Raises UpstreamError (its kind says what failed) or ValueError for a
        request that cannot be sent (bad method, target or header).
        """
        if self._closed:
            raise UpstreamError(ErrorKind.CONNECT, "the pool is closed", origin=self.name)
        to = timeouts or self.timeouts
        line = self._lines.get((method, target))
        if line is None:
            line = self._request_line(method, target)
        fields = headers.raw if isinstance(headers, HeaderBlock) else HeaderBlock.of(headers).raw
        streamed: AsyncIterable[bytes] | None = None
        data: bytes | None = None
        if body is None:
            head = request_head(line, fields, -1)
        elif isinstance(body, bytes):
            data = body
            head = request_head(line, fields, len(data))
        elif isinstance(body, bytearray | memoryview):
            data = bytes(body)
            head = request_head(line, fields, len(data))
        else:
            streamed = body
            if length is not None and length < 0:
                raise ValueError("length must be >= 0")
            head = request_head(line, fields, length)
        is_head = method == "HEAD"
        total_at = self.loop.time() + to.total if to.total else 0.0
        self.requests += 1
        fresh = False
        while True:
            idle = self._idle
            if idle and not fresh:  # (_acquire's common case, inlined: no coroutine)
                conn = idle.pop()
                conn.in_pool = False
                self.reuses += 1
            else:
                conn = await self._acquire(fresh, to, total_at)
            reused = conn.requests > 0
            try:
                if streamed is None:
                    resp = conn.send(head, data, is_head, to, total_at)
                else:
                    resp = await conn.send_streamed(head, streamed, is_head, to, total_at,
                                                    length)
                while not resp.status:  # (Response._wait, inlined: this runs for every request)
                    if resp._error is not None:
                        raise resp._error
                    waiter = resp._waiter = conn.loop.create_future()
                    try:
                        await waiter
                    except asyncio.CancelledError:
                        resp.close()  # the caller is gone: so is the upstream request
                        raise
                    finally:
                        resp._waiter = None
                return resp
            except UpstreamError as e:
                if (e.kind is ErrorKind.CLOSED and reused and not fresh
                        and (streamed is None or not conn.body_taken)):
                    self.stale_retries += 1
                    fresh = True
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled, or a bug: never leave a half-used connection
                raise

    def _request_line(self, method: str, target: str | bytes) -> bytes:
        """Checked once per (method, target): providers send the same few."""
        line = request_line(check_method(method), check_target(target), self._host)
        if len(self._lines) < 256:
            self._lines[method, target] = line
        return line

    # ------------------------------------------------------------ acquiring
    async def _acquire(self, fresh: bool, to: Timeouts, total_at: float) -> UpstreamConnection:
        """A connection when none is idle (or a retry wants a new one)."""
        while True:
            idle = self._idle
            if idle:
                if not fresh:
                    conn = idle.pop()
                    conn.in_pool = False
                    self.reuses += 1
                    return conn
                if self._count >= self.limits.max_connections:
                    # a retry wants a new connection: the oldest idle one makes room (the
                    # likeliest stale one; with idle ones about, nobody is waiting)
                    oldest = idle.pop(0)
                    oldest.in_pool = False
                    oldest.abort()
            if self._count < self.limits.max_connections:
                self._count += 1
                return await self._connect(to, total_at)
            got = await self._wait_turn(to, total_at)
            if got is None:
                return await self._connect(to, total_at)
            if got.closed:
                continue  # closed after it was handed to us: its slot has gone on
            if fresh:  # handed a used connection: close it, open a new one in its slot
                got.counted = False
                got.abort()
                return await self._connect(to, total_at)
            self.reuses += 1
            return got

    async def _wait_turn(self, to: Timeouts, total_at: float) -> UpstreamConnection | None:
        """Wait for a connection given back (returned) or a slot freed (None; the
        slot is already counted for us)."""
        loop = self.loop
        fut: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(fut)
        self.waits += 1
        limit = loop.time() + to.pool
        total = bool(total_at) and total_at < limit
        handle = loop.call_at(total_at if total else limit, self._wait_expired, fut, to, total)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                got = fut.result()  # handed to us as we were cancelled: pass it on
                if got is None:
                    self._count -= 1
                    self._grant_slot()
                else:
                    self.connection_released(got)
            raise
        finally:
            handle.cancel()
            if not fut.done() or fut.cancelled():
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass

    def _wait_expired(self, fut: asyncio.Future[UpstreamConnection | None], to: Timeouts,
                      total: bool) -> None:
        if fut.done():
            return
        self._waiters.remove(fut)
        if total:
            err = UpstreamError(ErrorKind.TOTAL_TIMEOUT,
                                f"exchange not finished within {to.total:g} s "
                                f"(waiting for a free connection)", origin=self.name)
        else:
            self.wait_timeouts += 1
            err = UpstreamError(ErrorKind.POOL_TIMEOUT,
                                f"no free connection within {to.pool:g} s "
                                f"({self.limits.max_connections} busy)", origin=self.name)
        fut.set_exception(err)

    async def _connect(self, to: Timeouts, total_at: float) -> UpstreamConnection:
        """Open a connection in a slot already counted; give the slot back on failure."""
        loop = self.loop
        origin = self.origin
        limit = to.connect
        total = False
        if total_at:
            left = total_at - loop.time()
            if left < limit:
                limit, total = max(left, 0.0), True
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, self.limits.max_head_bytes),
                    origin.host, origin.port, ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None)
        except BaseException as e:
            self._count -= 1
            self._grant_slot()
            self.connect_errors += 1
            if isinstance(e, TimeoutError):
                if total:
                    raise UpstreamError(ErrorKind.TOTAL_TIMEOUT,
                                        f"exchange not finished within {to.total:g} s "
                                        "(connecting)", origin=self.name) from None
                raise UpstreamError(ErrorKind.CONNECT_TIMEOUT,
                                    f"no connection within {to.connect:g} s",
                                    origin=self.name) from None
            if isinstance(e, ssl.SSLCertVerificationError):
                raise UpstreamError(ErrorKind.TLS, "TLS certificate not accepted: "
                                    f"{e.verify_message or e.reason}", origin=self.name) from None
            if isinstance(e, ssl.SSLError):
                raise UpstreamError(ErrorKind.TLS, f"TLS handshake failed: {e.__class__.__name__}"
                                    f" {getattr(e, 'reason', '') or ''}".rstrip(),
                                    origin=self.name) from None
            if isinstance(e, OSError):
                raise UpstreamError(ErrorKind.CONNECT, f"cannot connect: {_os_reason(e)}",
                                    origin=self.name) from None
            raise
        self.connects += 1
        self._conns.add(conn)
        return conn

    # ------------------------------------------------------------ PoolHooks
    def connection_released(self, conn: UpstreamConnection) -> None:
        """A response ended and the connection can carry another request."""
        if self._closed:
            conn.abort()
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        loop = conn.loop
        conn.idle_since = loop.time()
        conn.in_pool = True
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_at(conn.idle_since + self.limits.keepalive_s,
                                       self._sweep_idle)

    def connection_closed(self, conn: UpstreamConnection) -> None:
        """Called once per connection, whatever closed it."""
        self._conns.discard(conn)
        if conn.in_pool:
            conn.in_pool = False
            self._idle.remove(conn)
            self.closed_while_idle += 1
        if conn.counted:
            self._count -= 1
            self._grant_slot()

    def _grant_slot(self) -> None:
        if self._closed:
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                self._count += 1
                fut.set_result(None)
                return

    def _sweep_idle(self) -> None:
        self._sweep = None
        idle = self._idle
        keep = self.limits.keepalive_s
        expired = self.loop.time() - keep + 0.001
        while idle and idle[0].idle_since <= expired:
            conn = idle.pop(0)
            conn.in_pool = False
            self.idle_expired += 1
            conn.abort()
        if idle:
            self._sweep = self.loop.call_at(idle[0].idle_since + keep, self._sweep_idle)

    # ------------------------------------------------------------ closing
    def close(self) -> None:
        """Abort every connection, idle or busy; waiting requests fail."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._conns):
            conn.in_pool = False
            conn.abort()
        self._idle.clear()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(UpstreamError(ErrorKind.CONNECT, "the pool was closed",
                                                origin=self.name))


def _os_reason(e: OSError) -> str:
    """An OS error's own words (no URL, no request data in them)."""
    if e.errno and not isinstance(e, socket.gaierror):
        return os.strerror(e.errno)
    return e.strerror or e.__class__.__name__
