"""One upstream connection: an asyncio Protocol around the sans-IO ResponseParser.

It carries one exchange at a time (no pipelining): `send()` writes a request
whose body is in memory, `send_streamed()` one whose body comes from an async
iterator (with back-pressure); both return the Response, whose head the pool
then waits for. The response head and body chunks are pushed into that
Response as they are read. When the response ends and both sides allow it,
the connection goes back to its pool (`PoolHooks.connection_released`); in
every other case it is aborted and the pool told once (`connection_closed`).

Timeouts cost no timer per request: one lazy timer per connection fires at
the earliest time a deadline could pass, recomputes the deadline from what
the exchange is waiting for (first byte, the next read, the upstream taking
our body) and the total bound, and either fails the exchange or re-arms.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Protocol, cast

from .errors import ErrorKind, UpstreamError
from .h1_client import (
    BodyFramer,
    EndOfMessage,
    Event,
    ProtocolError,
    ResponseHead,
    ResponseParser,
)
from .response import Response
from .settings import Timeouts

# what the exchange waits for (the deadline that applies)
NONE, FIRST_BYTE, READ, WRITE = 0, 1, 2, 3

WRITE_HIGH_WATER = 65536    # unsent request bytes before an upload waits
_BIG_BODY = 16384           # larger bodies are written apart from the head (no copy)
_INF = float("inf")


class PoolHooks(Protocol):
    name: str   # the origin, for messages

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def connection_released(self, conn: UpstreamConnection) -> None: ...

    def connection_closed(self, conn: UpstreamConnection) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: PoolHooks, max_head_bytes: int) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.origin = pool.name
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(max_head_bytes, pool.name)
        self.response: Response | None = None   # the exchange in flight
        self.closed = False
        self.requests = 0           # exchanges started on it (> 0 at the start: reused)
        self.idle_since = 0.0
        self.in_pool = False        # on its pool's idle list
        self.counted = True         # holds a slot of the pool's bound (False: handed on)
        self.read_paused = False
        self.write_paused = False
        self.request_sent = True    # the whole request has been written
        self.body_taken = False     # a piece was taken from a streamed body: no replay
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timeouts = Timeouts()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._wait = NONE
        self._since = 0.0
        self._total_at = 0.0        # 0: no total bound

    # ------------------------------------------------------------ the exchange
    def _begin(self, head_request: bool, timeouts: Timeouts, total_at: float) -> Response:
        if self.closed:  # (the pool hands out open ones; a stale-retry kind if not)
            raise UpstreamError(ErrorKind.CLOSED, "connection closed before the request",
                                origin=self.origin)
        resp = self.response = Response(self, self.loop, self.origin)
        self.requests += 1
        self._timeouts = timeouts
        self.parser.expect(head_request)
        self._total_at = total_at
        if total_at:
            self._arm(total_at)
        return resp

    def send(self, head: bytes, body: bytes | None, head_request: bool, timeouts: Timeouts,
             total_at: float) -> Response:
        """Write a request whose body is in memory; its Response's head is yet to come."""
        resp = self._begin(head_request, timeouts, total_at)
        tr = self.transport
        assert tr is not None
        if not body:
            tr.write(head)
        elif len(body) > _BIG_BODY:
            tr.write(head)
            tr.write(body)
        else:
            tr.write(head + body)
        self.request_sent = True
        self._start_wait(FIRST_BYTE)
        return resp

    async def send_streamed(self, head: bytes, body: AsyncIterable[bytes], head_request: bool,
                            timeouts: Timeouts, total_at: float,
                            length: int | None = None) -> Response:
        """Write a request whose body is taken from `body` as the upstream takes
        it: chunked, or raw when the head declared `length` bytes."""
        resp = self._begin(head_request, timeouts, total_at)
        tr = self.transport
        assert tr is not None
        self.request_sent = False
        self.body_taken = False
        try:
            tr.write(head)
            await self._upload(resp, body, BodyFramer(length))
        except BaseException:
            # cancelled, or the caller's body failed: the upstream must not take
            # a truncated body for a whole one, so the connection goes
            resp._source = None
            self.abort()
            raise
        return resp

    async def _upload(self, resp: Response, body: AsyncIterable[bytes],
                      framer: BodyFramer) -> None:
        """A streamed request body, one piece in flight: wait while the upstream
        does not take our bytes (bounded by the idle timeout)."""
        tr = self.transport
        assert tr is not None
        async for piece in body:
            self.body_taken = True
            if self.closed or resp.status:
                return  # failed, or answered early: the request stays incomplete (no reuse)
            if piece:
                tr.write(framer.piece(piece))
                if self.write_paused:
                    await self._drain()
        if not self.closed:
            tail = framer.end()
            if tail:
                tr.write(tail)
            self.request_sent = True
            if not resp.status:
                self._start_wait(FIRST_BYTE)

    async def _drain(self) -> None:
        self._start_wait(WRITE)
        waiter = self._drain_waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None
            if self._wait == WRITE:
                self._wait = NONE

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        tr.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # idle in the pool: nothing is due from the upstream
            self.abort()
            return
        if self._wait != NONE:
            self._wait = READ
            self._since = self.loop.time()
        try:
            events = self.parser.feed(data)
        except ProtocolError as e:
            self._deliver(resp, e.events)
            self._fail(e)
            return
        if events:
            self._deliver(resp, events)

    def _deliver(self, resp: Response, events: list[Event]) -> None:
        for ev in events:
            if ev.__class__ is bytes:
                resp._push(ev)  # (a class test: cheaper than isinstance)
            elif isinstance(ev, ResponseHead):
                resp._on_head(ev)
                if self._drain_waiter is not None:  # answered before the whole body was sent
                    self._wake_drain()
            elif isinstance(ev, EndOfMessage):
                self._end(ev.keep_alive)
                return

    def _end(self, keep_alive: bool) -> None:
        resp = self.response
        assert resp is not None
        self.response = None
        self._wait = NONE
        self._total_at = 0.0
        resp._end()
        if self.read_paused:
            self.resume_reading()
        if keep_alive and self.request_sent and not self.closed:
            self.pool.connection_released(self)
        else:
            self.abort()

    def eof_received(self) -> bool:
        self._on_eof(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_eof(exc)
        self.transport = None

    def _on_eof(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if self.response is None:  # closed while idle: a stale keep-alive connection
            self.abort()
            return
        if exc is None:
            try:
                events = self.parser.feed_eof()
            except UpstreamError as e:
                self._fail(e)
                return
            self._deliver(self.response, events)
            return
        started = self.parser.received
        self._fail(UpstreamError(ErrorKind.CLOSED_MID_RESPONSE if started else ErrorKind.CLOSED,
                                 f"connection lost ({type(exc).__name__})"
                                 + (" before the end of the response" if started
                                    else " before any response byte"),
                                 origin=self.origin, response_started=started))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # ------------------------------------------------------------ reading (Response drives it)
    def pause_reading(self) -> None:
        tr = self.transport
        if not self.read_paused and tr is not None and not self.closed:
            self.read_paused = True
            tr.pause_reading()
            if self._wait == READ:  # our consumer is slow, not the upstream
                self._wait = NONE

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            tr = self.transport
            if tr is not None and not self.closed:
                tr.resume_reading()
                if self.response is not None:
                    self._start_wait(READ)

    # ------------------------------------------------------------ closing
    def abort(self) -> None:
        """Close now, unflushed; the pool is told once. The upstream sees the
        connection closed as soon as the loop runs its I/O."""
        if self.closed:
            return
        self.closed = True
        self.response = None
        t = self._timer
        if t is not None:
            t.cancel()
            self._timer = None
        tr = self.transport
        if tr is not None:
            tr.abort()
        self._wake_drain()
        self.pool.connection_closed(self)

    def _fail(self, err: UpstreamError) -> None:
        resp = self.response
        if resp is not None:
            self.response = None
            resp._fail(err)
        self.abort()

    # ------------------------------------------------------------ deadlines
    def _start_wait(self, kind: int) -> None:
        now = self.loop.time()
        self._wait = kind
        self._since = now
        to = self._timeouts
        # for a first byte, arm at the earlier of both: the first read starts the
        # idle clock and must not find the timer set later than its deadline
        self._arm(now + (min(to.first_byte, to.idle) if kind == FIRST_BYTE else to.idle))

    def _arm(self, when: float) -> None:
        t = self._timer
        if t is not None:
            if self._timer_at <= when:
                return  # it fires early enough and re-arms itself if need be
            t.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or self.response is None:
            return
        to = self._timeouts
        wait = self._wait
        due, kind = _INF, ErrorKind.TOTAL_TIMEOUT
        if wait == FIRST_BYTE:
            due, kind = self._since + to.first_byte, ErrorKind.FIRST_BYTE_TIMEOUT
        elif wait != NONE:
            due, kind = self._since + to.idle, ErrorKind.IDLE_TIMEOUT
        total = self._total_at
        if total and total < due:
            due, kind = total, ErrorKind.TOTAL_TIMEOUT
        if due == _INF:
            return
        if self.loop.time() + 0.001 < due:
            self._arm(due)
            return
        if kind == ErrorKind.FIRST_BYTE_TIMEOUT:
            msg = f"no response within {to.first_byte:g} s of the request"
        elif kind == ErrorKind.TOTAL_TIMEOUT:
            msg = f"exchange not finished within {to.total:g} s"
        elif wait == WRITE:
            msg = f"the upstream took none of the request body for {to.idle:g} s"
        else:
            msg = f"no response data for {to.idle:g} s"
        self._fail(UpstreamError(kind, msg, origin=self.origin,
                                 response_started=self.parser.received))
