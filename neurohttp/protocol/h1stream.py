"""Streamed request bodies, sans-IO: a route that asks for it gets its request
as soon as the head is parsed, and the body's pieces as they arrive.

Used only when the application has such a route (App.max_upload > 0): then
the connection is a `StreamingConnection` over a `StreamingParser`; every
other server keeps the plain H1Connection, whose per-request path this
module does not touch.

* `BodyReader` is the body of one streamed request: the parser pushes pieces
  into it, the handler's side takes them out (messages.py turns that into an
  async iterator). It holds at most `high` bytes before the connection stops
  reading (`should_read`), so an upload costs a few read sizes of memory
  whatever its length; its own limit (the route's upload limit) gives 413.
* `StreamingParser` decides at each head whether the route streams
  (`upload_limit(request)` > 0, and the request has a body); if so it hands
  the request out at once, pushes body bytes into its reader and ends it at
  the message's end. A request answered before its body has ended cannot
  keep the connection alive (its `keep_alive` is false until the body ends):
  the answer says Connection: close and the rest of the body is read and
  dropped by the lingering close.
* `StreamingConnection` adds the flow control, the timeouts of a body in
  flight (the client must send something every `body_timeout` while we read:
  nginx's client_body_timeout, between two reads, not for the whole body; the
  handler's request_timeout runs from the body's last progress), the 100
  Continue sent when the handler first asks for the body, and a failed body
  (bad framing, over its limit, the client's EOF) reported to the handler
  through its reader instead of as a second answer. A client that closes
  mid-body has gone (its handler is cancelled with the connection).

No clock is read here and no asyncio is used: callbacks (`wake`, `pulled`)
are what the I/O side hooks in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .h1 import (
    PHASE_BODY,
    PHASE_DONE,
    PHASE_IDLE,
    H1Parser,
    HttpError,
    RequestFactory,
    RequestLike,
)
from .h1conn import INF, WAITING, Due, H1Connection
from .settings import ConnectionSettings

HIGH_WATER = 256 * 1024  # bytes of a streamed body held before reading pauses
_MUST_CLOSE = 3           # h1conn.Conn.MUST_CLOSE (an int compare: Conn is an IntEnum)


class BodyError(Exception):
    """The streamed body cannot be read to its end: `status` is the answer it
    calls for (400 bad framing or the client stopped sending, 408 too slow,
    413 over its limit, 499 the client went away)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyReader:
    """The body of one streamed request, between the parser and the handler."""

    __slots__ = ("chunks", "buffered", "received", "limit", "high", "ended", "error",
                 "wake", "pulled", "progress_at")

    def __init__(self, limit: int, high: int, now: float) -> None:
        self.chunks: deque[bytes] = deque()
        self.buffered = 0          # bytes pushed and not yet taken
        self.received = 0          # bytes pushed in all
        self.limit = limit
        self.high = high
        self.ended = False         # the whole body has been pushed
        self.error: BodyError | None = None
        # the consumer's wake-up (called once, then cleared) and the I/O side's
        # hook run at each take (resume reading, 100 Continue)
        self.wake: Callable[[], Any] | None = None
        self.pulled: Callable[[BodyReader], None] | None = None
        self.progress_at = now     # the last piece pushed or taken

    @property
    def full(self) -> bool:
        return self.buffered >= self.high

    @property
    def open(self) -> bool:
        """More of the body may still come."""
        return not self.ended and self.error is None

    def push(self, data: bytes, now: float) -> None:
        if self.error is not None:
            return  # failed: what still comes is dropped
        self.received += len(data)
        if self.received > self.limit:
            raise HttpError(413, f"request body over {self.limit} bytes")
        self.chunks.append(data)
        self.buffered += len(data)
        self.progress_at = now
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def fail(self, status: int, message: str) -> None:
        if self.error is None and not self.ended:
            self.error = BodyError(status, message)
            self.chunks.clear()
            self.buffered = 0
            self._wake()

    def take(self) -> bytes | None:
        """The next piece; b"" once the body has ended; None when nothing has
        come yet (wait for `wake`). Raises BodyError for a failed body."""
        chunks = self.chunks
        if chunks:
            data = chunks.popleft()
            self.buffered -= len(data)
            return data
        if self.error is not None:
            raise self.error
        return b"" if self.ended else None

    def _wake(self) -> None:
        w = self.wake
        if w is not None:
            self.wake = None
            w()


class StreamedRequestLike(RequestLike, Protocol):
    reader: BodyReader | None


SR = TypeVar("SR", bound=StreamedRequestLike)


def body_framing(raw_headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a head the parser accepted (one length at
    most, chunked last: llhttp and H1Parser have checked)."""
    length: int | None = None
    chunked = False
    for name, value in raw_headers:
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            length = int(value)
        elif n == 17 and name.lower() == b"transfer-encoding":
            chunked = True
    return length, chunked


class StreamingParser(H1Parser[SR]):
    """H1Parser that hands a streamed route's request out at its head (see the
    module doc). `max_body_bytes` stays the bound of collected bodies."""

    def __init__(self, client: str, max_header_bytes: int, max_body_bytes: int,
                 make_request: RequestFactory[SR], upload_limit: Callable[[SR], int],
                 max_upload: int, high: int = HIGH_WATER) -> None:
        # the base checks Content-Length against the largest limit; each request
        # is then held to its own (collected or its route's upload limit)
        super().__init__(client, max_header_bytes, max(max_body_bytes, max_upload), make_request)
        self.collect_limit = max_body_bytes
        self.upload_limit = upload_limit
        self.high = high
        self.reader: BodyReader | None = None   # the streamed body in progress
        self.pulled: Callable[[BodyReader], None] | None = None  # given to each reader
        self.stream_failed = False  # the last error ended a streamed body (its handler answers)
        self._streamed: SR | None = None
        self._keep = False          # the streamed request's keep-alive once its body ends
        self._now = 0.0

    def feed(self, data: bytes, now: float) -> list[SR]:
        self._now = now
        return super().feed(data, now)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        req = self._pending
        assert req is not None
        length, chunked = body_framing(req.raw_headers)
        if (length is None and not chunked) or length == 0 or self._p.should_upgrade():
            return  # no body (or an Upgrade, whose body the base collects)
        limit = self.upload_limit(req)
        if not limit:
            if length is not None and length > self.collect_limit:
                raise HttpError(413, f"request body over {self.collect_limit} bytes")
            return
        if length is not None and length > limit:
            raise HttpError(413, f"request body over {limit} bytes")
        reader = self.reader = BodyReader(limit, self.high, self._now)
        reader.pulled = self.pulled
        req.reader = reader
        self._keep = req.keep_alive
        req.keep_alive = False  # until the body has ended (see the module doc)
        self._streamed = req
        self._done.append(req)  # answered now; the body follows

    def on_body(self, body: bytes) -> None:
        reader = self.reader
        if reader is None:
            if self._body_len + len(body) > self.collect_limit:
                raise HttpError(413, f"request body over {self.collect_limit} bytes")
            super().on_body(body)
            return
        self._body_len += len(body)  # (the base's framing bound and resume prefix read it)
        reader.push(body, self._now)
        self.continue_pending = False

    def on_message_complete(self) -> None:
        req = self._streamed
        if req is None or req is not self._pending:
            super().on_message_complete()
            return
        reader = self.reader
        assert reader is not None
        self._streamed = None
        self.reader = None
        self._pending = None
        self._body_len = 0
        self.phase = PHASE_IDLE
        self.continue_pending = False
        req.keep_alive = self._keep
        reader.end()

    def _fail(self, err: HttpError[Any]) -> HttpError[SR]:
        reader = self.reader
        if reader is not None:
            reader.fail(err.status, err.message)
            self.reader = None
            self._streamed = None
            self.stream_failed = True
        return super()._fail(err)

    def fail_stream(self, status: int, message: str) -> None:
        """The body in flight will not be read to its end (a timeout, the
        client's EOF): its handler is told; the parser takes no more input."""
        reader = self.reader
        if reader is not None:
            reader.fail(status, message)
            self.reader = None
            self._streamed = None
            self._pending = None
            self.phase = PHASE_DONE  # the connection closes after the answer


class StreamingConnection(H1Connection[SR]):
    """H1Connection with streamed request bodies (see the module doc)."""

    __slots__ = ()
    parser: StreamingParser[SR]

    def __init__(self, settings: ConnectionSettings, client: str,
                 make_request: RequestFactory[SR], now: float,
                 upload_limit: Callable[[SR], int], max_upload: int,
                 high: int = HIGH_WATER) -> None:
        super().__init__(settings, client, make_request, now)
        self.parser = StreamingParser(client, settings.max_header_bytes,
                                      settings.max_body_bytes, make_request, upload_limit,
                                      max_upload, high)

    @property
    def reader(self) -> BodyReader | None:
        """The streamed body being received, if any."""
        return self.parser.reader

    def receive(self, data: bytes, now: float) -> list[SR]:
        reqs = super().receive(data, now)
        r = self.parser.reader
        if r is not None and r.buffered >= r.high:
            self.attention = True  # the caller re-checks should_read: stop reading
        return reqs

    def _refuse(self, e: HttpError[SR], now: float) -> None:
        parser = self.parser
        if not parser.stream_failed:
            super()._refuse(e, now)
            return
        # the refused input was a streamed body: its handler has the error and
        # answers it; that answer is the connection's last
        parser.stream_failed = False
        if e.requests:
            self.fresh = False
            self.defer(e.requests, now)
        self.close_after_answer()
        self.attention = True

    def should_read(self) -> bool:
        r = self.parser.reader
        if r is not None and r.buffered >= r.high and self.state < _MUST_CLOSE:
            return False  # the handler is behind: the client waits (TCP flow control)
        return super().should_read()

    def eof_received(self) -> bool:
        if self.parser.reader is not None:
            # the body cannot end now: the client has gone, as nginx sees it (499);
            # False: close now, and the handler is cancelled with the connection
            # (lost() then fails the body for anything else still reading it)
            super().eof_received()
            return False
        return super().eof_received()

    def lost(self) -> None:
        self.parser.fail_stream(499, "the client closed the connection")
        super().lost()

    def continue_due(self, reader: BodyReader) -> bool:
        """The handler asks for `reader`'s body: True when a 100 Continue must
        go out first (the client waits for it; sent once)."""
        parser = self.parser
        if parser.continue_pending and parser.reader is reader and self.state < _MUST_CLOSE:
            parser.continue_pending = False
            return True
        return False

    def stall(self) -> None:
        """Due.STALL: the client sent none of the body for body_timeout."""
        self.parser.fail_stream(408, "request body not received in time")
        self.close_after_answer()

    def deadline(self) -> tuple[float, Due]:
        when, due = super().deadline()
        r = self.parser.reader
        if r is None or self.state >= _MUST_CLOSE:
            return when, due
        if due is Due.EXPIRE and self.exchange is WAITING:
            # an upload in progress: the answer is due request_timeout after the
            # body's last progress, not after the head
            when = max(when, r.progress_at + self.settings.request_timeout)
        if r.buffered < r.high and self.parser.phase == PHASE_BODY:
            stall = r.progress_at + self.settings.body_timeout
            if stall < when or when == INF:
                return stall, Due.STALL
        return when, due
