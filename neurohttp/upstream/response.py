"""An upstream response as its consumer sees it: the head, then the body
streamed chunk by chunk, pulled by the consumer.

The connection pushes body chunks in; the consumer takes them out with
`async for chunk in response` (or `read()`, `json()`, `sse()`). Reading from
the upstream pauses while more than HIGH_WATER bytes wait here and resumes
below LOW_WATER: a slow consumer slows the upstream down instead of growing a
buffer. Closing a response before its end (`close()`, `aclose()`, leaving
`async with`, a consumer cancelled while it waits) aborts its connection at
once, so the upstream sees the disconnect within the loop turn; a response
read to its end has already given its connection back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Protocol

import orjson

from ..messages import Headers
from .errors import ErrorKind, UpstreamError
from .h1_client import ResponseHead, parse_fields, parse_reason
from .sse import MAX_EVENT_BYTES, SSEEvent, sse_batches, sse_events

HIGH_WATER = 65536
LOW_WATER = 16384


class BodySource(Protocol):
    """What a response needs from the connection that feeds it."""

    read_paused: bool

    def resume_reading(self) -> None: ...

    def pause_reading(self) -> None: ...

    def abort(self) -> None: ...


class Response:
    """status, reason, headers (case-insensitive, lazily built), raw_headers,
    origin. Iterate for the body; `complete` once all of it has arrived."""

    __slots__ = ("status", "_head", "_raw_headers", "_headers", "origin", "_source",
                 "_loop", "_chunks", "_buffered", "_waiter", "_done", "_error", "_closed",
                 "__weakref__")

    def __init__(self, source: BodySource, loop: asyncio.AbstractEventLoop, origin: str) -> None:
        self.status = 0
        self._head: ResponseHead | None = None
        self._raw_headers: list[tuple[bytes, bytes]] | None = None
        self._headers: Headers | None = None
        self.origin = origin
        self._source: BodySource | None = source  # None once the body is complete or closed
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: UpstreamError | None = None
        self._closed = False

    # ------------------------------------------------------------ the head
    @property
    def reason(self) -> str:
        return parse_reason(self._head.raw).decode("latin-1") if self._head else ""

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The fields as (name, value) bytes pairs, in order, repeats kept."""
        raw = self._raw_headers
        if raw is None:
            raw = self._raw_headers = parse_fields(self._head.raw) if self._head else []
        return raw

    @property
    def headers(self) -> Headers:
        """Case-insensitive str mapping (repeated fields joined with ", ")."""
        h = self._headers
        if h is None:
            h = self._headers = Headers(self.raw_headers)
        return h

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be unread)."""
        return self._done

    @property
    def retry_after(self) -> float | None:
        """Retry-After in seconds (a number or an HTTP date), None when absent or invalid."""
        value = self.headers.get("retry-after")
        if value is None:
            return None
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None

    def raise_for_status(self) -> None:
        """UpstreamError(kind "status") for a 4xx or 5xx, with `status` and `retry_after`."""
        if self.status >= 400:
            raise UpstreamError(ErrorKind.STATUS, f"upstream answered {self.status}",
                                origin=self.origin, response_started=True,
                                status=self.status, retry_after=self.retry_after)

    # ------------------------------------------------------------ the body
    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                # Everything that arrived meanwhile, as one chunk (chunk borders mean
                # nothing in HTTP): a consumer that forwards it writes once, not per
                # upstream chunk (an SSE upstream sends one per event).
                if len(chunks) == 1:
                    data = chunks.popleft()
                else:
                    data = b"".join(chunks)
                    chunks.clear()
                self._buffered -= len(data)
                src = self._source
                if src is not None and src.read_paused and self._buffered <= LOW_WATER:
                    src.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._done or self._closed:
                raise StopAsyncIteration
            await self._wait()

    async def read(self, limit: int = 0) -> bytes:
        """The rest of the body. `limit` > 0: a body larger than that is refused
        (kind "protocol") and the connection closed."""
        if self._done and self._error is None and (not limit or self._buffered <= limit):
            chunks = self._chunks  # all there (the common case for a small answer)
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            return data
        parts: list[bytes] = []
        size = 0
        async for data in self:
            size += len(data)
            if limit and size > limit:
                self.close()
                raise UpstreamError(ErrorKind.PROTOCOL, f"response body over {limit} bytes",
                                    origin=self.origin, response_started=True)
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def json(self, limit: int = 0) -> Any:
        return orjson.loads(await self.read(limit))

    def sse(self, max_event_bytes: int = 0) -> AsyncIterator[SSEEvent]:
        """The body as Server-Sent Events (see sse.py)."""
        return sse_events(self, max_event_bytes or MAX_EVENT_BYTES)

    def sse_batches(self, max_event_bytes: int = 0) -> AsyncIterator[list[SSEEvent]]:
        """The body as lists of Server-Sent Events, one per read (see sse.py)."""
        return sse_batches(self, max_event_bytes or MAX_EVENT_BYTES)

    # ------------------------------------------------------------ closing
    def close(self) -> None:
        """Stop: a response not yet complete aborts its connection now."""
        self._closed = True
        self._chunks.clear()
        self._buffered = 0
        src = self._source
        if src is not None:
            self._source = None
            src.abort()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # a consumer that dropped a response mid-body must not leave the upstream
        # generating into a connection nobody reads
        src = self._source
        if src is not None:
            self._source = None
            with contextlib.suppress(Exception):  # at exit the loop may be gone
                src.abort()

    def __repr__(self) -> str:  # no header values: they may carry keys or cookies
        return f"<Response {self.status} from {self.origin}>"

    # ------------------------------------------------------------ fed by the connection
    def _on_head(self, head: ResponseHead) -> None:
        self.status = head.status
        self._head = head
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.close()  # the consumer is gone: so is the upstream request
            raise
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _push(self, data: bytes) -> None:
        if self._closed:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._buffered > HIGH_WATER:
            src = self._source
            if src is not None and not src.read_paused:
                src.pause_reading()

    def _end(self) -> None:
        self._done = True
        self._source = None
        self._wake()

    def _fail(self, err: UpstreamError) -> None:
        if self._error is None and not self._done:
            self._error = err
        self._source = None
        self._wake()
