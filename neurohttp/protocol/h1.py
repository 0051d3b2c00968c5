"""HTTP/1.1 request parsing, sans-IO: bytes in, complete Requests out.

httptools (llhttp, strict mode) does the tokenising and already refuses most
smuggling vectors: CL together with TE, duplicate Content-Length, a
Transfer-Encoding whose last coding is not chunked, bad chunk sizes, obs-fold,
bare CR, control bytes in header values, whitespace before the colon. This
module adds what llhttp leaves to the server: the head and body size limits,
the HTTP version and Host rules, Expect: 100-continue and Upgrade.

No socket calls here: `feed()` returns the requests completed by the bytes it
was given and raises HttpError for input that must be refused (the caller
answers it with `error.status` and closes the connection).

The request objects are made by the class the caller passes (`make_request`:
messages.Request in the server), so this layer imports nothing above it and
the parser builds the very object handlers see, with no copy per request.
`RequestLike` is what the protocol layer itself reads and writes on them.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any, Generic, Protocol, TypeVar

import httptools

from . import method as _method


class RequestLike(Protocol):
    """The fields of a request the protocol layer sets and reads."""

    method: str
    target: bytes
    version: str
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool


R = TypeVar("R", bound=RequestLike)
# (method, target, version, raw headers, client address, keep-alive) -> request
RequestFactory = Callable[[str, bytes, str, list[tuple[bytes, bytes]], str, bool], R]

# Interned method names: avoid a decode per request for the common ones.
_METHODS = {m.encode(): m for m in
            ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT")}

PHASE_IDLE, PHASE_HEAD, PHASE_BODY, PHASE_UPGRADE_BODY, PHASE_DONE = 0, 1, 2, 3, 4
PHASE_METHOD = 5  # an unknown method whose request line must be seen (protocol/method.py)
_METHOD_TAILS = _method.METHOD_TAILS

# The request fields the parser acts on, found by one dict lookup in their usual
# spelling; another case is lower-cased only when its length could match.
_HOST, _LENGTH, _CONNECTION, _EXPECT, _TE = 1, 2, 3, 4, 5
_FIELD_KIND = {b"host": _HOST, b"content-length": _LENGTH, b"connection": _CONNECTION,
               b"expect": _EXPECT, b"transfer-encoding": _TE}
_FIELD_LENGTHS = frozenset(map(len, _FIELD_KIND))
_FIELD_KIND.update({name.title(): kind for name, kind in list(_FIELD_KIND.items())})


class HttpError(Exception, Generic[R]):
    """Input the server must refuse: answer `status` and close the connection.

    `requests` holds the requests completed earlier in the same feed: the caller
    answers them first, so the outcome does not depend on how the bytes were split.
    `request` is the refused request as far as it was parsed (target and fields),
    or None, so the refusal can take the route's error shape (JSON under /v1/).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.requests: list[R] = []
        self.request: R | None = None


def _check_codings(te: bytes) -> bool:
    """Check a Transfer-Encoding list (all its lines joined); True: chunked.

    llhttp refuses (400) a final coding other than chunked, sometimes only after
    on_headers_complete: 400 here too, and for chunked applied twice. A valid list
    with another coding is 501: we decode no other coding, and would otherwise
    hand gzip bytes to handlers. The same answer whether the codings come on one
    line or several."""
    if te == b"chunked":
        return True
    codings = [c.strip() for c in te.lower().split(b",")]
    if codings[-1] != b"chunked":
        raise HttpError(400, "chunked must be the final transfer coding")
    if b"chunked" in codings[:-1]:
        raise HttpError(400, "chunked must be applied only once")
    raise HttpError(501, "only the chunked transfer coding is supported")


# llhttp's reason for a method it knows from another protocol (RTSP's DESCRIBE, ...)
_FOREIGN_METHOD = "Invalid method for HTTP/x.x request"

# llhttp reasons that mean "a well-formed version we do not speak" (505, not 400)
_VERSION_ERRORS = frozenset({"Invalid HTTP version", "Pause on PRI/Upgrade",
                             "Expected HTTP/2 Connection Preface"})


class H1Parser(Generic[R]):
    """Parses a stream of HTTP/1.x requests from one connection.

    Attributes the I/O layer reads between feeds:
      phase         PHASE_* of the message in progress
      body_started  time (as passed to feed) the current head completed, for a
                    body still incomplete at the end of a feed
      continue_pending  the current request awaits "100 Continue"
      upgrade       set to (request, leftover bytes) when a request asked to
                    switch protocols; the parser accepts no more input then
    """

    def __init__(self, client: str, max_header_bytes: int, max_body_bytes: int,
                 make_request: RequestFactory[R]) -> None:
        self.client = client
        self._make = make_request
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        # a Content-Length with fewer characters than this is under the limit unparsed
        self._max_body_digits = len(str(max_body_bytes))
        self._p = httptools.HttpRequestParser(self)
        # Whitespace after a chunk size ("5 ;ext", RFC 9112 7.1.1 BWS): the size is
        # still hex digits only, and "5 5", "5 x" or " 5" stay refused.
        self._p.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self.phase = PHASE_IDLE
        self.body_started = 0.0
        self.continue_pending = False
        self.upgrade: tuple[R, bytes] | None = None
        self._done: list[R] = []
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0           # bytes of the request target seen through callbacks
        self._head_bound = 0          # at least the bytes of the head in progress
        self._measure = False         # this feed may complete a head over the limit
        self._head_bytes = 0          # bytes of head seen through whole chunks
        self._framing = 0             # body-phase bytes fed with no body data in them
        # The body so far: the first piece as it came (most bodies are one piece),
        # then a BytesIO, whose memory stays near the body's length however small
        # the chunks (a list of millions of 2-byte pieces took ~70x the body).
        self._body: bytes | BytesIO | None = None
        self._body_len = 0
        self._pending: R | None = None  # head parsed, body in progress
        self._upgrade_remaining = 0
        # Bytes that bring a fresh llhttp parser to this one's state, to find a refused
        # method's request line (protocol/method.py); None after a chunked request.
        self._resume: bytes | None = b""
        self._line = b""              # PHASE_METHOD: the refused request line so far

    # ------------------------------------------------------------ input
    def feed(self, data: bytes, now: float) -> list[R]:
        """Parse `data`; return the requests it completed, oldest first.

        After an HttpError the parser takes no more input (feed returns []).
        """
        phase = self.phase
        if phase >= PHASE_UPGRADE_BODY:
            if phase == PHASE_METHOD:
                return self._feed_method(data)
            return self._feed_after_upgrade(data)
        body_before = self._body_len
        # A head that completes in this feed has at most len(data) bytes more than
        # its earlier reads: only when that could pass the limit are its fields
        # summed (on_headers_complete), so on_header does no accounting.
        self._measure = len(data) + (self._head_bound if phase == PHASE_HEAD else 0) \
            > self.max_header_bytes
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            try:
                return self._on_upgrade(data[e.args[0]:])
            except HttpError as err:
                raise self._fail(err) from None
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, HttpError):
                raise self._fail(cause) from None
            raise
        except httptools.HttpParserInvalidMethodError:
            return self._refused_method(data)
        except httptools.HttpParserInvalidURLError:
            raise self._fail(HttpError(400, "invalid request target")) from None
        except httptools.HttpParserError as e:
            reason = str(e)
            if reason in _VERSION_ERRORS:
                raise self._fail(HttpError(505, "HTTP version not supported")) from None
            if reason == _FOREIGN_METHOD:
                raise self._fail(HttpError(501, "method not implemented")) from None
            raise self._fail(HttpError(400, reason or "malformed request")) from None
        done = self._done
        end = self.phase
        # self._resume is still what it was before this feed (or None after a chunked
        # head in it): the common case, a feed ending after a whole message with no
        # method begun, keeps b"" at the cost of one test here.
        if end:
            # A message is still incomplete: bound what httptools buffers for it
            # (a partial header or trailer value), counting whole chunks.
            if end == PHASE_HEAD:
                if phase == PHASE_HEAD and not done:
                    self._head_bytes += len(data)
                    self._head_bound += len(data)
                else:
                    self._head_bytes = self._head_size + self._fields_size()
                    self._head_bound = len(data)
                if self._head_bytes > self.max_header_bytes:
                    raise self._fail(HttpError(431, "request header fields too large"))
            elif end == PHASE_BODY:
                if phase != PHASE_BODY or done:
                    self.body_started = now  # its head completed in this feed
                # Chunk-size lines, extensions and trailers: only reads that carried
                # no body data count, so small legitimate chunks never add up.
                if phase == PHASE_BODY and not done and self._body_len == body_before:
                    self._framing += len(data)
                    if self._framing > self.max_header_bytes:
                        raise self._fail(HttpError(431, "chunk framing or trailer fields too large"))
                else:
                    self._framing = 0
            if self._resume is not None:
                self._keep_resume(self._resume, data, end, len(done))
        elif (data and data[-1] in _METHOD_TAILS) or self._resume:
            if self._resume is not None:  # (a request line begun, or a carry to keep)
                self._keep_resume(self._resume, data, end, len(done))
        if done:
            self._done = []
        return done

    # ------------------------------------------------------------ unknown methods
    def _keep_resume(self, resume: bytes, data: bytes, end: int, done: int) -> None:
        """Update the resume prefix after a feed (the common case, a feed ending
        after a whole message with no method begun, keeps b"" and never comes here)."""
        if end == PHASE_BODY:
            self._resume = self._body_resume()
        elif end > PHASE_BODY:
            self._resume = None  # an Upgrade: llhttp parses no more on this connection
        elif not done:
            self._resume = (resume + data).lstrip(b"\r\n")
        elif end == PHASE_HEAD or data[-1] in _METHOD_TAILS:
            buf = resume + data  # the new message begins after the last complete one
            at = _method.message_end(buf, done)
            self._resume = buf[at:].lstrip(b"\r\n") if at >= 0 else None
        else:
            self._resume = b""

    def _body_resume(self) -> bytes | None:
        """A Content-Length body in progress, as a synthetic head (method.body_prefix)."""
        req = self._pending
        if req is None:
            return None
        for name, value in req.raw_headers:
            if len(name) == 14 and name.lower() == b"content-length":
                return _method.body_prefix(int(value) - self._body_len)
        return None

    def _refused_method(self, data: bytes) -> list[R]:
        """llhttp refused a method: 501 if the request line starts with a token and a
        space (an unknown method), else 400; wait for more bytes while undecided."""
        resume = self._resume  # (as before this feed, or None after a chunked head in it)
        if resume is None:  # a chunked request came first
            raise self._fail(HttpError(400, "invalid request method"))
        done = len(self._done)
        buf = resume + data
        at = _method.message_end(buf, done) if done else 0
        if at < 0:
            raise self._fail(HttpError(400, "invalid request method"))
        self._line = buf[at:].lstrip(b"\r\n")
        self.phase = PHASE_METHOD
        self._judge_method()
        reqs = self._done  # answered first; the verdict comes with a later feed
        self._done = []
        return reqs

    def _feed_method(self, data: bytes) -> list[R]:
        self._line += data
        self._judge_method()
        return []

    def _judge_method(self) -> None:
        status = _method.verdict(self._line, self.max_header_bytes)
        if status == 501:
            raise self._fail(HttpError(501, "method not implemented"))
        if status is not None:
            raise self._fail(HttpError(400, "invalid request method"))

    def _fail(self, err: HttpError[Any]) -> HttpError[R]:
        """Attach the requests completed before `err`; take no more input."""
        err.requests = self._done
        self._done = []
        err.request = self.partial_request()
        self._pending = None
        self._body = None
        self.phase = PHASE_DONE
        self.continue_pending = False
        self.upgrade = None
        self._line = b""
        return err

    def partial_request(self) -> R | None:
        """The request in progress as far as it was parsed (its target and fields,
        for the shape of a refusal or a timeout: JSON under /v1/), or None."""
        if self._pending is not None:
            return self._pending
        if self.phase == PHASE_HEAD and self._url:
            m = self._p.get_method()
            return self._make(_METHODS.get(m) or m.decode("latin-1"), self._url, "1.1",
                              self._headers, self.client, False)
        return None

    # ------------------------------------------------------------ httptools callbacks
    # No on_message_begin: a request's head starts with its first target byte,
    # which saves a callback per request (a partial method alone stays "idle").
    def on_url(self, url: bytes) -> None:
        if self.phase == PHASE_IDLE:
            self.phase = PHASE_HEAD
            self._url = url
            self._head_size = len(url)
            self._head_bytes = 0
        else:
            self._url += url
            self._head_size += len(url)
        if self._head_size > self.max_header_bytes:
            # the request line shares the head's budget: 431, never 414 (ARCHITECTURE.md)
            raise HttpError(431, "request header fields too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.phase == PHASE_HEAD:  # not chunked trailer fields: accepted and ignored
            self._headers.append((name, value))

    def _fields_size(self) -> int:
        # "name:value CRLF" at least per field: never more than the bytes on the wire
        return sum(len(n) + len(v) + 3 for n, v in self._headers)

    def on_headers_complete(self) -> None:
        p = self._p
        headers = self._headers
        if self._measure and self._head_size + self._fields_size() > self.max_header_bytes:
            raise HttpError(431, "request header fields too large")
        hosts = 0
        length: bytes | None = None  # llhttp has checked it is digits, and only one
        te: bytes | None = None
        expect = chunked = connection = False
        for name, value in headers:
            kind = _FIELD_KIND.get(name)
            if kind is None:
                if len(name) not in _FIELD_LENGTHS:
                    continue
                kind = _FIELD_KIND.get(name.lower())
                if kind is None:
                    continue
            if kind == _HOST:
                hosts += 1
            elif kind == _LENGTH:
                length = value
            elif kind == _CONNECTION:
                connection = True
            elif kind == _EXPECT:
                if value.lower().rstrip() != b"100-continue":  # llhttp keeps trailing OWS
                    raise HttpError(417, "only 'Expect: 100-continue' is supported")
                expect = True
            else:  # Transfer-Encoding: several lines are one list (RFC 9110 5.3)
                te = value if te is None else te + b"," + value
        if te is not None:
            chunked = _check_codings(te)
            self._resume = None  # no prefix rebuilds a chunked body's state (method.py)
        keep_alive = p.should_keep_alive()
        if keep_alive and not connection:
            # llhttp keeps a request alive without a Connection header only for
            # HTTP/1.1, so the (costly) version string is not needed here.
            version = "1.1"
        else:
            version = p.get_http_version()
            if version != "1.1" and version != "1.0":
                if version in ("2.0", "3.0"):
                    raise HttpError(505, f"HTTP/{version} is not supported over this connection")
                raise HttpError(400, f"unsupported HTTP version {version}")
        if hosts != 1 and (hosts or version == "1.1"):
            raise HttpError(400, "exactly one Host header is required" if hosts
                            else "missing Host header")
        if chunked and version == "1.0":
            raise HttpError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
        if length is not None and len(length) >= self._max_body_digits \
                and int(length) > self.max_body_bytes:
            raise HttpError(413, f"request body over {self.max_body_bytes} bytes")
        method = p.get_method()
        url = self._url
        if url == b"*" and method != b"OPTIONS":
            raise HttpError(400, "the target '*' is only for OPTIONS")  # RFC 9112 3.2.4
        self._headers = []  # after the checks: a refusal still sees them (HttpError.request)
        self._pending = self._make(_METHODS.get(method) or method.decode("latin-1"), url,
                                   version, headers, self.client, keep_alive)
        self.phase = PHASE_BODY
        if expect and (chunked or (length is not None and int(length) > 0)):
            self.continue_pending = True

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.max_body_bytes:
            raise HttpError(413, f"request body over {self.max_body_bytes} bytes")
        b = self._body
        if b is None:
            self._body = body
        elif isinstance(b, bytes):
            buf = self._body = BytesIO()
            buf.write(b)
            buf.write(body)
        else:
            b.write(body)
        self.continue_pending = False

    def _take_body(self) -> bytes:
        """The collected body, handed over without a copy (BytesIO.getvalue shares
        its buffer once it is trimmed to size)."""
        b = self._body
        self._body = None
        self._body_len = 0
        if b is None:
            return b""
        return b if isinstance(b, bytes) else b.getvalue()

    def on_message_complete(self) -> None:
        req = self._pending
        if req is None:  # cannot happen with llhttp; keep the invariant explicit
            raise HttpError(400, "malformed request")
        if self._body is not None:
            req.body = self._take_body()
        self._pending = None
        self.phase = PHASE_IDLE
        if self.continue_pending:  # e.g. an empty chunked body: no 100 after the answer
            self.continue_pending = False
        self._done.append(req)

    # ------------------------------------------------------------ Upgrade
    def _on_upgrade(self, rest: bytes) -> list[R]:
        """llhttp stops at a request that asks to switch protocols (or CONNECT)."""
        done = self._done
        self._done = []
        req = done.pop() if done else self._pending
        if req is None:
            raise HttpError(400, "malformed upgrade request")
        req.keep_alive = False
        if req.method == "CONNECT":
            self.phase = PHASE_DONE
            return done + [req]
        self.upgrade = (req, rest)
        # Whoever does not take the upgrade answers the request as plain HTTP;
        # llhttp has not consumed a Content-Length body, so collect it here.
        length = 0
        for name, value in req.raw_headers:
            if len(name) == 14 and name.lower() == b"content-length":
                length = int(value)
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                self._done = done  # answered before the error (see HttpError.requests)
                raise HttpError(400, "a chunked body with Upgrade is not supported")
        self._upgrade_remaining = length
        self._body = None
        self._body_len = 0
        self._pending = req
        self.phase = PHASE_UPGRADE_BODY
        if length == 0:
            self.phase = PHASE_DONE
            self._pending = None
            return done + [req]
        return done + self._feed_after_upgrade(rest)

    def take_upgrade(self) -> tuple[R, bytes] | None:
        """The caller switches protocols: hand over the request and the bytes after it."""
        up = self.upgrade
        self.upgrade = None
        self._pending = None
        self.phase = PHASE_DONE
        return up

    def _feed_after_upgrade(self, data: bytes) -> list[R]:
        if self.phase != PHASE_UPGRADE_BODY or self._pending is None:
            return []  # the connection closes after this request: ignore the rest
        self.upgrade = None  # a request with a body is never switched
        take = data[:self._upgrade_remaining]
        self._upgrade_remaining -= len(take)
        if take:
            self.on_body(take)  # within max_body_bytes: its Content-Length was checked
        if self._upgrade_remaining:
            return []
        req = self._pending
        req.body = self._take_body()
        self._pending = None
        self.phase = PHASE_DONE
        return [req]
