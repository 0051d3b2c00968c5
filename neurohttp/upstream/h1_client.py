"""HTTP/1.1, client side, sans-IO: request bytes out, response events in.

No socket calls here. The I/O layer (connection.py) writes what
`request_head` returns (chunked bodies use the server's `protocol.serialize.chunk`), calls `ResponseParser.expect()` when a
request has been sent, and feeds the bytes it reads to `feed()` (and EOF to
`feed_eof()`). Each returns the events the bytes completed, in order:

    ResponseHead   status, raw (the status line and fields, parsed on demand)
    bytes          a piece of the body (never empty)
    EndOfMessage   the response is complete; `keep_alive` says whether the
                   connection may carry another request

httptools (llhttp, strict) tokenises and validates. This module adds what a
client must decide itself: which responses have no body (a response to HEAD,
1xx, 204, 304), skipping interim 1xx responses, close-delimited bodies (ended
by EOF, which llhttp cannot be told about), the keep-alive decision, bounds on
what a hostile upstream can make us buffer (head size, chunk framing and
trailers), and data the upstream sends when no response is due.

Response heads are fed to llhttp exactly up to their blank line, so a
bodiless response leaves no body bytes inside llhttp: when llhttp would read
a body the request's method rules out (HEAD), the parser is replaced.

Errors are UpstreamError(kind="protocol"), or kind "closed" /
"closed_mid_response" from `feed_eof`. An error raised by `feed` carries the
events completed before it (`error.events`) so the outcome does not depend on
how the bytes were split; after an error the parser takes no more input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import httptools

from ..protocol.serialize import LAST_CHUNK, chunk
from .errors import ErrorKind, UpstreamError

MAX_HEAD_BYTES = 65536

# Parser states
IDLE, HEAD, BODY, CLOSED = 0, 1, 2, 3

_TERMINATOR = b"\r\n\r\n"


class ResponseHead:
    """A final response head. `raw` is its status line and fields, each line
    ending in CRLF (not the blank line): llhttp has checked them. They are cut
    out of the read that carried them, and split into fields (`parse_fields`),
    only when someone asks."""

    __slots__ = ("status", "_raw", "_buf")

    def __init__(self, status: int, raw: bytes = b"") -> None:
        self.status = status
        self._raw = raw
        self._buf = b""   # the bytes the head starts (after empty lines) in, when raw is unset

    @property
    def raw(self) -> bytes:
        if not self._raw and self._buf:
            self._raw = _head_slice(self._buf)
            self._buf = b""
        return self._raw

    def __repr__(self) -> str:  # field values may be secrets (Set-Cookie, echoed keys)
        return f"ResponseHead({self.status})"


def parse_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs of a head llhttp accepted (strict: no obs-fold, no
    space before the colon, CRLF line ends), values without surrounding OWS."""
    lines = raw.split(b"\r\n")
    out = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            out.append((name, value.strip(b" \t")))
    return out


def parse_reason(raw: bytes) -> bytes:
    line = raw[:raw.find(b"\r\n")]
    parts = line.split(b" ", 2)
    return parts[2] if len(parts) > 2 else b""


def _head_slice(buf: bytes) -> bytes:
    """The first head in `buf`, after the empty lines llhttp skips before one."""
    start = 0
    n = len(buf)
    while start < n and buf[start] in (13, 10):
        start += 1
    return buf[start:buf.find(_TERMINATOR, start) + 2]


class EndOfMessage:
    __slots__ = ("keep_alive",)

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return f"EndOfMessage(keep_alive={self.keep_alive})"


Event = ResponseHead | bytes | EndOfMessage


class ProtocolError(UpstreamError):
    """Bytes that are not a valid response (kind "protocol"); `events` holds the
    events completed before them in the same feed."""

    def __init__(self, message: str, origin: str, response_started: bool) -> None:
        super().__init__(ErrorKind.PROTOCOL, message, origin=origin,
                         response_started=response_started)
        self.events: list[Event] = []


class _Unsolicited(Exception):
    """Raised inside llhttp's callback to stop it at a message nobody asked for."""


class _Reparse(Exception):
    """Raised inside llhttp's callback at a 1xx met the fast way."""


class ResponseParser:
    """Parses the responses of one connection, one per `expect()` call.

    Attributes the I/O layer reads:
      state      IDLE (no response due), HEAD, BODY or CLOSED (no more input)
      received   a byte of the current response has arrived (decides retries)

    A read that starts a response and fits in the head budget goes to llhttp
    whole (the common case: head and body in one read), with llhttp calling
    back only at the head's end, for body data and at the message's end. The
    exact way (heads fed up to their blank line) takes responses to HEAD,
    reads that could pass the head budget, and exchanges with a 1xx (the
    exchange's bytes are parsed again that way: nothing was emitted yet).
    """

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES, origin: str = "") -> None:
        self.max_head_bytes = max_head_bytes
        self.origin = origin
        self.state = IDLE
        self.received = False
        self._p = httptools.HttpResponseParser(self)
        self._events: list[Event] = []
        self._exact = False       # feed heads up to their blank line (see the class doc)
        self._fast = False        # llhttp is parsing a read the fast way
        self._head_request = False
        self._head_bytes = 0      # bytes fed while a head was due (interim heads included)
        self._seen: list[bytes] = []  # the current head's bytes, while it spans reads
        self._tail = b""          # the last <= 3 head bytes: a blank line may straddle reads
        self._head: ResponseHead | None = None  # completed in this feed, raw not yet set
        self._interim = False     # the head being parsed is a 1xx (exact way)
        self._no_body = False
        self._until_close = False
        self._keep_alive = False
        self._end: EndOfMessage | None = None
        self._framing = 0         # body-phase bytes fed that carried no body data
        self._body_fed = False

    # ------------------------------------------------------------ driving
    def expect(self, head_request: bool = False) -> None:
        """A request was sent: its response is due. `head_request`: it was a HEAD."""
        if self.state != IDLE:
            raise RuntimeError("a response is still in progress on this connection")
        self.state = HEAD
        self.received = False
        self._exact = self._head_request = head_request
        self._head_bytes = 0
        if self._seen:
            self._seen = []
        self._tail = b""

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data`; return the events it completed, oldest first."""
        events: list[Event] = []
        self._events = events
        self._end = None
        try:
            if self.state == HEAD and not self._exact \
                    and self._head_bytes + len(data) <= self.max_head_bytes:
                self.received = True
                self._fast = True
                reparse = False
                try:
                    self._p.feed_data(data)
                except httptools.HttpParserError as e:
                    self._fast = False
                    if not isinstance(e.__context__, _Reparse):
                        head = self._head
                        if head is not None:  # the error came in the body: keep its head
                            self._head = None
                            head._buf = b"".join(self._seen) + data if self._seen else data
                        raise
                    reparse = True
                if reparse:
                    # outside the except clause: the replay's own errors keep their
                    # cause as __context__ (read below), not this HttpParserError
                    self._replay(data)
                    return events
                self._fast = False
                head = self._head
                if head is not None:
                    self._head = None
                    seen = self._seen
                    if seen:
                        self._seen = []
                        data = b"".join(seen) + data
                    self._head_done(head, data)
                elif self.state == HEAD:  # the head goes on in the next read
                    self._head_bytes += len(data)
                    self._seen.append(data)
                    self._tail = (self._tail + data)[-3:]
                return events
            self._feed(data)
        except ProtocolError as e:
            raise self._fail(e) from None
        except httptools.HttpParserCallbackError as e:
            err = e.__context__
            if isinstance(err, ProtocolError):
                raise self._fail(err) from None
            if isinstance(err, _Unsolicited):
                return events
            raise
        except httptools.HttpParserUpgrade:
            raise self._fail(self._error("the upstream switched protocols unasked")) from None
        except httptools.HttpParserError as e:
            if self._end is not None:  # garbage after a complete response: not reused
                self._end.keep_alive = False
                self.state = CLOSED
                return events
            raise self._fail(self._error(f"invalid response: {e}")) from None
        return events

    def feed_eof(self) -> list[Event]:
        """The upstream closed its side: end a close-delimited body, or fail."""
        state = self.state
        self.state = CLOSED
        if state == BODY and self._until_close:
            return [EndOfMessage(False)]
        if state == HEAD:
            if not self.received:
                raise UpstreamError(ErrorKind.CLOSED, "connection closed before any response byte",
                                    origin=self.origin)
            raise UpstreamError(ErrorKind.CLOSED_MID_RESPONSE,
                                "connection closed inside the response head",
                                origin=self.origin, response_started=True)
        if state == BODY:
            raise UpstreamError(ErrorKind.CLOSED_MID_RESPONSE,
                                "connection closed before the end of the response body",
                                origin=self.origin, response_started=True)
        return []

    # ------------------------------------------------------------ phases
    def _feed(self, data: bytes) -> None:
        while data:
            state = self.state
            if state == BODY:
                self._feed_body(data)
                return
            if state == HEAD:
                data = self._feed_head(data)
            elif state == IDLE:
                if not data.strip(b"\r\n"):
                    return  # empty lines between messages: ignored, as llhttp does
                end = self._end
                if end is None:
                    raise self._error("data from the upstream while no response was due")
                end.keep_alive = False  # bytes after the response we asked for
                self.state = CLOSED
                return
            else:
                return

    def _replay(self, data: bytes) -> None:
        """A 1xx came the fast way: parse its head again, the exact way, with a
        new llhttp (the bytes since the last message boundary are in _seen).
        Nothing was emitted for the exchange yet (no final head): invisible."""
        seen = b"".join(self._seen) + data
        self._p = httptools.HttpResponseParser(self)
        self._exact = True
        self._head_bytes = 0
        self._seen = []
        self._tail = b""
        self._feed(seen)

    def _feed_head(self, data: bytes) -> bytes:
        """The exact way: feed head bytes up to the blank line; return what follows."""
        self.received = True
        tail = self._tail
        joined = tail + data if tail else data
        end = joined.find(_TERMINATOR)
        if end < 0:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                raise self._error(f"response head over {self.max_head_bytes} bytes")
            self._p.feed_data(data)
            self._seen.append(data)
            self._tail = joined[-3:]
            return b""
        cut = end + 4 - len(tail)
        self._head_bytes += cut
        if self._head_bytes > self.max_head_bytes:
            raise self._error(f"response head over {self.max_head_bytes} bytes")
        self._tail = b""
        part = data[:cut] if cut < len(data) else data
        self._p.feed_data(part)
        seen = self._seen
        raw = b"".join(seen) + part if seen else part
        self._seen = []
        if self._interim:
            # a 1xx llhttp did not end (not 100/102/103): it expects a body a 1xx
            # never has
            self._p = httptools.HttpResponseParser(self)
            self._interim = False
        head = self._head
        if head is not None:
            self._head = None
            self._head_done(head, raw)
            if self.state == BODY and self._no_body:
                # llhttp waits for a body this response cannot have (a response to HEAD)
                self._p = httptools.HttpResponseParser(self)
                self._finish()
        return data[cut:] if cut < len(data) else b""

    def _head_done(self, head: ResponseHead, buf: bytes) -> None:
        """A final head's bytes are known (`buf` starts with them): decide the framing.

        llhttp keeps a response alive only with Content-Length or chunked framing
        (and Connection tokens and a version that allow it), so then nothing is
        left to check and the head is not even cut out. Otherwise (and for every
        head the exact way) the fields are read: a transfer coding other than
        chunked is refused (we decode no other), and a body with neither length
        nor chunked framing runs to EOF. A response to HEAD without either is,
        conservatively, not kept alive.
        """
        status = head.status
        self._no_body = self._head_request or status == 204 or status == 304
        if self._keep_alive and not self._exact:
            head._buf = buf
            self._until_close = False
            return
        raw = head._raw = _head_slice(buf)
        lower = raw.lower()
        chunked = False
        if b"\ntransfer-encoding:" in lower:
            for name, value in parse_fields(lower):
                if name == b"transfer-encoding" and value != b"chunked":
                    del self._events[self._events.index(head):]
                    raise self._error("unsupported transfer coding in the response")
            chunked = True
        self._until_close = not (self._keep_alive or self._no_body or chunked
                                 or b"\ncontent-length:" in lower)

    def _feed_body(self, data: bytes) -> None:
        self._body_fed = False
        self._p.feed_data(data)
        if self.state == BODY:
            # Chunk-size lines, extensions, trailers: bounded like a head, counting
            # only reads that carried no body data (many small chunks are fine).
            if self._body_fed:
                self._framing = 0
            else:
                self._framing += len(data)
                if self._framing > self.max_head_bytes:
                    raise self._error("chunk framing or trailer fields too large")

    # ------------------------------------------------------------ httptools callbacks
    # (no on_status, no on_header: the head's bytes are kept and parsed on demand)
    def on_message_begin(self) -> None:
        if self.state != HEAD:  # a second response in the bytes after the one we asked for
            if self._end is not None:
                self._end.keep_alive = False
            self.state = CLOSED
            raise _Unsolicited

    def on_headers_complete(self) -> None:
        p = self._p
        status = p.get_status_code()
        if status < 200:
            if status == 101:
                raise self._error("the upstream switched protocols unasked")
            if self._fast:
                raise _Reparse
            self._interim = True
            return
        self._keep_alive = p.should_keep_alive()
        head = self._head = ResponseHead(status)
        self._events.append(head)
        self.state = BODY

    def on_body(self, body: bytes) -> None:
        self._body_fed = True
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self._interim:  # llhttp ended a 100, 102 or 103 itself
            self._interim = False
            return
        self._finish()

    # ------------------------------------------------------------ helpers
    def _finish(self) -> None:
        end = self._end = EndOfMessage(self._keep_alive)
        self._events.append(end)
        self.state = IDLE

    def _error(self, message: str) -> ProtocolError:
        return ProtocolError(message, self.origin, self.received)

    def _fail(self, err: ProtocolError) -> ProtocolError:
        err.events = self._events
        self._events = []
        self.state = CLOSED
        return err


# ---------------------------------------------------------------- requests
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")

# Fields the client owns: framing and connection management are decided here,
# per hop (RFC 9110 7.6.1), so a caller's (or a proxied client's) values are dropped.
MANAGED_FIELDS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                            "keep-alive", "te", "trailer", "upgrade", "proxy-connection",
                            "expect"})


class HeaderBlock:
    """Request header fields, checked and encoded once: reuse one per deployment.

    Names must be tokens, values latin-1 without control characters (CR/LF
    would split the request). The fields in MANAGED_FIELDS are dropped. repr()
    shows the names only: values carry API keys.
    """

    __slots__ = ("raw", "names")

    def __init__(self, fields: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        items = fields.items() if isinstance(fields, Mapping) else fields
        out: list[bytes] = []
        names: list[str] = []
        for name, value in items:
            try:
                n = name.encode("ascii")
            except UnicodeEncodeError:
                raise ValueError("invalid header field name") from None
            if not _TOKEN.fullmatch(n):
                raise ValueError(f"invalid header field name {name[:40]!r}")
            if name.lower() in MANAGED_FIELDS:
                continue
            try:
                v = str(value).encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"header {name!r}: value is not latin-1") from None
            if _BAD_VALUE.search(v):
                raise ValueError(f"header {name!r}: control character in the value")
            out.append(b"%s: %s\r\n" % (n, v.strip(b" \t")))
            names.append(name)
        self.raw = b"".join(out)
        self.names = tuple(names)

    @classmethod
    def of(cls, fields: HeaderBlock | Mapping[str, str] | Iterable[tuple[str, str]] | None
           ) -> HeaderBlock:
        if isinstance(fields, HeaderBlock):
            return fields
        return EMPTY_HEADERS if fields is None else cls(fields)

    def __add__(self, other: HeaderBlock) -> HeaderBlock:
        block = HeaderBlock()
        block.raw = self.raw + other.raw
        block.names = self.names + other.names
        return block

    def __repr__(self) -> str:
        return f"HeaderBlock({', '.join(self.names)})"


EMPTY_HEADERS = HeaderBlock()


def check_method(method: str) -> bytes:
    m = method.encode("ascii", "replace")
    if not _TOKEN.fullmatch(m):
        raise ValueError("invalid request method")
    return m


def check_target(target: str | bytes) -> bytes:
    """An origin-form target ("/path?query"); refuses spaces and control bytes."""
    t = target.encode("utf-8") if isinstance(target, str) else target
    if t[:1] != b"/" or _BAD_TARGET.search(t):
        raise ValueError("invalid request target")  # never echoed: a query may hold a key
    return t


def request_line(method: bytes, target: bytes, host: bytes) -> bytes:
    """Request line and Host field: the part a pool caches per (method, target)."""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, host)


class BodyFramer:
    """A streamed request body's framing: chunked (`length` None), or the raw
    pieces of a body whose Content-Length was declared, held to that length
    (a body that runs over or ends short would desynchronise the connection:
    ValueError, and the caller closes it)."""

    __slots__ = ("length", "sent")

    def __init__(self, length: int | None) -> None:
        self.length = length
        self.sent = 0

    def piece(self, data: bytes) -> bytes:
        """The bytes to write for `data` (not empty)."""
        if self.length is None:
            return chunk(data)
        self.sent += len(data)
        if self.sent > self.length:
            raise ValueError(f"streamed request body over its Content-Length ({self.length})")
        return data

    def end(self) -> bytes:
        """The bytes that end the body."""
        if self.length is None:
            return LAST_CHUNK
        if self.sent != self.length:
            raise ValueError(f"streamed request body ended at {self.sent} of its "
                             f"Content-Length ({self.length}) bytes")
        return b""


def request_head(line: bytes, fields: bytes, length: int | None) -> bytes:
    """The whole head. `length` None: a chunked body follows; -1: no body."""
    if length is None:
        return b"%s%sTransfer-Encoding: chunked\r\n\r\n" % (line, fields)
    if length < 0:
        return b"%s%s\r\n" % (line, fields)
    return b"%s%sContent-Length: %d\r\n\r\n" % (line, fields, length)
