"""Server-Sent Events, split out of a byte stream (WHATWG HTML "event stream").

`SSEDecoder` is sans-IO: `feed(bytes)` returns the events the bytes completed.
Lines end in LF, CRLF or CR; `data:` lines of one event are joined with LF;
`event:`, `id:` and `retry:` are kept; comment lines (`: ping`) are counted
and dropped; an event is dispatched at its blank line, and only if it has
data. A UTF-8 BOM at the very start is dropped. Nothing but the incomplete
line and the current event's data is held, bounded by `max_event_bytes`
(kind "protocol" beyond it), so a long stream never grows a buffer.

`sse_batches(chunks)` does the same over an async iterator of chunks (a
Response), a list of events per chunk; `sse_events(chunks)` one event at a
time. OpenAI-style streams end with `data: [DONE]`: that event
(`event.done`) comes last; the rest of the body is read first (for at most
`done_grace_s`), so the connection goes back to the pool instead of being cut
by a consumer that stops at [DONE].
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import orjson

from .errors import ErrorKind, UpstreamError

MAX_EVENT_BYTES = 4 << 20
DONE = b"[DONE]"
_BOM = b"\xef\xbb\xbf"


class SSEEvent:
    __slots__ = ("data", "event", "id", "retry", "done")

    def __init__(self, data: bytes, event: str = "", id: str | None = None,
                 retry: int | None = None) -> None:
        self.data = data      # the data lines joined with LF (bytes: orjson reads them as is)
        self.event = event    # "" for the default type "message"
        self.id = id
        self.retry = retry
        # the OpenAI end-of-stream marker `data: [DONE]` (an attribute: read twice per event)
        self.done = data == DONE

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.data)

    def __repr__(self) -> str:
        return f"SSEEvent(event={self.event!r}, {len(self.data)} data bytes)"


class SSEDecoder:
    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.comments = 0
        self._rest = b""            # an incomplete line
        self._data: list[bytes] = []
        self._size = 0              # bytes in _data
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._started = False       # past the optional BOM
        self._skip_lf = False

    def feed(self, data: bytes) -> list[SSEEvent]:
        if not self._started:  # the optional BOM, then never again
            if self._rest:
                data = self._rest + data
                self._rest = b""
            if len(data) < 3 and _BOM.startswith(data):
                self._rest = data
                return []
            self._started = True
            if data.startswith(_BOM):
                data = data[3:]
        if (data[-2:] == b"\n\n" and not self._rest and not self._data
                and not self._skip_lf and not self._event and self._retry is None
                and b"\r" not in data):
            # The common read (OpenAI's streams): whole events of one `data: ` line
            # each, nothing pending. Anything else takes the general way below.
            events: list[SSEEvent] = []
            limit = self.max_event_bytes
            for block in data[:-2].split(b"\n\n"):
                if block[:6] != b"data: " or b"\n" in block or len(block) > limit:
                    break
                events.append(SSEEvent(block[6:], "", self._id))
            else:
                return events
        if self._skip_lf:  # the LF of a CRLF whose CR ended the previous read
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self._rest + data if self._rest else data
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                self._skip_lf = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._rest = rest = lines.pop()
        if len(rest) + self._size > self.max_event_bytes:
            raise self._too_big()
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent(b"\n".join(self._data), self._event, self._id,
                                           self._retry))
                    self._data = []
                    self._size = 0
                self._event = ""
                self._retry = None
                continue
            if line[0] == 0x3A:  # ":" starts a comment
                self.comments += 1
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
                self._size += len(value) + 1
                if self._size > self.max_event_bytes:
                    raise self._too_big()
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\0" not in value:
                    self._id = value.decode("utf-8", "replace")
            elif name == b"retry":
                if value.isdigit():
                    self._retry = int(value)
            # other fields are ignored (WHATWG)
        return events

    def _too_big(self) -> UpstreamError:
        return UpstreamError(ErrorKind.PROTOCOL,
                             f"server-sent event over {self.max_event_bytes} bytes",
                             response_started=True)


async def sse_batches(chunks: AsyncIterable[bytes], max_event_bytes: int = MAX_EVENT_BYTES,
                      done_grace_s: float = 1.0) -> AsyncIterator[list[SSEEvent]]:
    """The events of a streamed body, in lists: the events each chunk of the
    body completed (a Response hands over everything that arrived in one read
    as one chunk), so a consumer can forward them with one write instead of
    one per event. `[DONE]` ends the last list (see the module doc); nothing
    after it is passed on.

    An event left incomplete when the body ends is dropped, as the standard says.
    """
    decoder = SSEDecoder(max_event_bytes)
    it = aiter(chunks)
    async for data in it:
        events = decoder.feed(data)
        if not events:
            continue
        for i, event in enumerate(events):
            if event.done:
                if getattr(chunks, "complete", False):
                    async for _ in it:  # all there already (usual): no timer needed
                        pass
                else:
                    try:
                        async with asyncio.timeout(done_grace_s):
                            async for _ in it:
                                pass
                    except TimeoutError:
                        pass  # the consumer's close() cuts what the upstream still holds open
                yield events if i == len(events) - 1 else events[:i + 1]
                return
        yield events


async def sse_events(chunks: AsyncIterable[bytes], max_event_bytes: int = MAX_EVENT_BYTES,
                     done_grace_s: float = 1.0) -> AsyncIterator[SSEEvent]:
    """The events of a streamed body, one at a time; `[DONE]` last (sse_batches)."""
    async for events in sse_batches(chunks, max_event_bytes, done_grace_s):
        for event in events:
            yield event
