"""Request and response objects as handlers and plugins see them.

Nothing here knows about sockets or HTTP framing: the connection builds a
Request from parsed bytes and turns a Response back into bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from .protocol.h1stream import BodyError, BodyReader

__all__ = ["BodyError", "Headers", "Request", "Response", "StreamedRequest",
           "StreamingResponse", "WebSocketUpgrade"]


class Headers(MutableMapping[str, str]):
    """Case-insensitive header mapping built lazily from the raw (name, value) list.

    Repeated request headers are joined with ", " (RFC 9110 5.3).
    """

    __slots__ = ("_raw", "_map")

    def __init__(self, raw: list[tuple[bytes, bytes]] | None = None) -> None:
        self._raw = raw or []
        self._map: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        m: dict[str, str] = {}
        for name, value in self._raw:
            k = name.decode("latin-1").lower()
            v = value.decode("latin-1")
            m[k] = f"{m[k]}, {v}" if k in m else v
        self._map = m
        return m

    def __getitem__(self, key: str) -> str:
        return (self._map if self._map is not None else self._build())[key.lower()]

    def __setitem__(self, key: str, value: str) -> None:
        (self._map if self._map is not None else self._build())[key.lower()] = value

    def __delitem__(self, key: str) -> None:
        del (self._map if self._map is not None else self._build())[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map if self._map is not None else self._build())

    def __len__(self) -> int:
        return len(self._map if self._map is not None else self._build())

    def get(self, key: str, default: Any = None) -> Any:
        return (self._map if self._map is not None else self._build()).get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        m = self._map if self._map is not None else self._build()
        return isinstance(key, str) and key.lower() in m

    def raw(self) -> list[tuple[bytes, bytes]]:
        return self._raw

    def __repr__(self) -> str:
        return f"Headers({dict(self)!r})"


class Request:
    """One HTTP request with its whole body.

    Only what the parser knows is set at construction (this runs once per
    request); headers, path, query and JSON are computed on first use.
    """

    __slots__ = ("method", "target", "version", "raw_headers", "body", "client", "keep_alive",
                 "_headers", "_path", "_query_string", "_query", "_json", "_state",
                 "key", "usage")

    def __init__(self, method: str, target: bytes, version: str,
                 raw_headers: list[tuple[bytes, bytes]], client: str, keep_alive: bool,
                 body: bytes = b"") -> None:
        self.method = method
        self.target = target
        self.version = version
        self.raw_headers = raw_headers
        self.client = client
        self.keep_alive = keep_alive
        self.body = body
        # Lazily computed. None, not an unset slot: raising AttributeError to
        # find out costs more than these stores.
        self._headers: Headers | None = None
        self._path: str | None = None
        self._query: dict[str, str] | None = None
        self._json: Any = _UNSET
        self._state: dict[str, Any] | None = None
        # The API key the request was admitted with (security/keys.py ApiKey:
        # its name, models, limits; never the key itself), None without one.
        self.key: Any = None
        # The request's generation, once it has reported (a context.UsageEvent:
        # model, key, tokens, latency, outcome); None for other requests.
        self.usage: Any = None

    @property
    def headers(self) -> Headers:
        h = self._headers
        if h is None:
            h = self._headers = Headers(self.raw_headers)
        return h

    @property
    def state(self) -> dict[str, Any]:
        """Per-request scratch space for plugins."""
        st = self._state
        if st is None:
            st = self._state = {}
        return st

    def _split_target(self) -> str:
        t = self.target
        if t[:1] != b"/":
            # absolute-form (RFC 9112 3.2.2): keep only the path and query
            if t[:7].lower() == b"http://" or t[:8].lower() == b"https://":
                rest = t.split(b"//", 1)[1]
                slash = rest.find(b"/")
                t = rest[slash:] if slash >= 0 else b"/"
        path, _, qs = t.partition(b"?")
        p = path.decode("latin-1")
        if "%" in p:
            p = unquote(p, encoding="utf-8", errors="replace")
        self._path = p
        self._query_string = qs.decode("latin-1")
        return p

    @property
    def path(self) -> str:
        p = self._path
        return p if p is not None else self._split_target()

    @property
    def query_string(self) -> str:
        if self._path is None:
            self._split_target()
        return self._query_string

    @property
    def query(self) -> dict[str, str]:
        q = self._query
        if q is None:
            q = self._query = dict(parse_qsl(self.query_string, keep_blank_values=True))
        return q

    def json(self) -> Any:
        """The body parsed as JSON (whatever the Content-Type); raises ValueError."""
        j = self._json
        if j is _UNSET:
            j = self._json = orjson.loads(self.body)
        return j

    def stream(self) -> AsyncIterator[bytes]:
        """The body as an async iterator of pieces. On a route registered with
        `stream_body=True` they come as the client sends them (and `body` is
        b""); elsewhere the collected body comes as one piece. Iterate once."""
        return _one_piece(self.body)

    @property
    def streamed(self) -> bool:
        """The body comes through stream() as it arrives (not in `body`)."""
        return False

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target.decode('latin-1')!r} from {self.client}>"


class StreamedRequest(Request):
    """The request of a server with streamed-body routes (the connection makes
    these only then: `reader` costs the others nothing). `reader` is set by the
    parser when the request's route streams its body."""

    __slots__ = ("reader",)

    def __init__(self, method: str, target: bytes, version: str,
                 raw_headers: list[tuple[bytes, bytes]], client: str, keep_alive: bool,
                 body: bytes = b"") -> None:
        super().__init__(method, target, version, raw_headers, client, keep_alive, body)
        self.reader: BodyReader | None = None

    def stream(self) -> AsyncIterator[bytes]:
        reader = self.reader
        return _one_piece(self.body) if reader is None else _pieces(reader)

    @property
    def streamed(self) -> bool:
        return self.reader is not None


async def _one_piece(body: bytes) -> AsyncIterator[bytes]:
    if body:
        yield body


async def _pieces(reader: BodyReader) -> AsyncIterator[bytes]:
    """A streamed body's pieces as they arrive; raises BodyError when it cannot
    be read to its end. Taking a piece lets the connection read on (and sends a
    100 Continue the client waits for), so a slow consumer slows the client."""
    loop = asyncio.get_running_loop()
    while True:
        data = reader.take()
        pulled = reader.pulled
        if pulled is not None:
            pulled(reader)
        if data is None:
            fut: asyncio.Future[None] = loop.create_future()
            reader.wake = _waker(fut)
            await fut
            continue
        if not data:
            return
        yield data


def _waker(fut: asyncio.Future[None]) -> Callable[[], None]:
    def wake() -> None:
        if not fut.done():
            fut.set_result(None)
    return wake


_UNSET = object()


class Response:
    """A complete response. `headers` is a plain mutable dict; Content-Length,
    Transfer-Encoding and Connection are the server's to set.

    `trusted_headers` are header lines (b"name: value\\r\\n" each) sent as they
    are, for code that builds them itself: numbers, durations, names it
    chose, or a fixed set checked once with protocol.serialize.extra_headers.
    Unlike `headers`, they are not checked for CR/LF on every response, so
    they must never carry a client's input."""

    __slots__ = ("body", "status", "headers", "content_type", "trusted_headers")

    def __init__(self, body: bytes | str = b"", status: int = 200,
                 headers: dict[str, str] | None = None,
                 content_type: str = "text/plain", trusted_headers: bytes = b"") -> None:
        self.body = body.encode() if isinstance(body, str) else body
        self.status = status
        self.headers = {} if headers is None else headers
        self.content_type = content_type
        self.trusted_headers = trusted_headers

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(orjson.dumps(obj), status, headers, "application/json")

    @classmethod
    def html(cls, text: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(text.encode(), status, headers, "text/html; charset=utf-8")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.content_type} {len(self.body)} bytes>"


class StreamingResponse:
    """A response whose body is produced over time: each item of `chunks` is sent
    at once (chunked framing on HTTP/1.1), nothing is buffered.

    `on_close(cancelled)` runs once when the stream ends, whether it finished
    or the client went away. `abort_chunk` is sent as the last piece when the
    server ends the stream itself (its shutdown deadline passed).
    """

    __slots__ = ("chunks", "status", "headers", "content_type", "on_close", "idle_ping",
                 "idle_after", "abort_chunk", "trusted_headers")

    def __init__(self, chunks: AsyncIterator[bytes], status: int = 200,
                 headers: dict[str, str] | None = None,
                 content_type: str = "application/octet-stream",
                 on_close: Callable[[bool], None] | None = None,
                 idle_ping: bytes | None = None, idle_after: float = 0.0,
                 abort_chunk: bytes | None = None, trusted_headers: bytes = b"") -> None:
        self.chunks = chunks
        self.status = status
        self.headers = {} if headers is None else headers
        self.content_type = content_type
        self.trusted_headers = trusted_headers  # as Response.trusted_headers
        self.on_close = on_close
        # bytes to send when the stream has been idle for idle_after seconds (SSE ": ping")
        self.idle_ping = idle_ping
        self.idle_after = idle_after
        self.abort_chunk = abort_chunk


class WebSocketUpgrade:
    """A handler's answer that switches the connection to WebSocket.

    `accept` is the Sec-WebSocket-Accept value; `session()` makes the object
    that receives the text messages (see worker/websocket.py).
    """

    __slots__ = ("accept", "session", "headers", "trusted_headers")

    def __init__(self, accept: str, session: Callable[[], Any],
                 headers: dict[str, str] | None = None, trusted_headers: bytes = b"") -> None:
        self.accept = accept
        self.session = session
        self.headers = {} if headers is None else headers
        self.trusted_headers = trusted_headers  # as Response.trusted_headers
