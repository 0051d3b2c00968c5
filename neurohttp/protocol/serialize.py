"""HTTP/1.1 response serialisation, sans-IO: response parts in, bytes out."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from .. import SERVER_NAME

STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}
REASONS: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Connection header by (keep_alive, http10)
_CONN = {
    (True, False): b"",
    (False, False): b"Connection: close\r\n",
    (True, True): b"Connection: keep-alive\r\n",
    (False, True): b"Connection: close\r\n",
}

# Headers the server owns: a handler's value for these is ignored.
_MANAGED = frozenset({"content-length", "transfer-encoding", "connection", "server", "date",
                      "content-type"})

_ctype_cache: dict[str, bytes] = {}


# (status, content type) -> status line + Server + Date + Content-Type, for this second
_prefixes: dict[tuple[int, str], bytes] = {}
# (status, content type, length, keep-alive, HTTP/1.0) -> whole head of an answer with
# no fields of its own, for this second: response_head fills it, and the hot path
# (protocol/h1conn.py respond) looks in it before calling response_head
HEADS: dict[tuple[int, str, int, bool, bool], bytes] = {}
_heads = HEADS


class Clock:
    """The `Server` and `Date` lines, rebuilt once a second by the worker's tick."""

    def __init__(self) -> None:
        self.common = b""
        self.second = 0
        self.tick()

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        sec = int(now)
        if sec != self.second:
            self.second = sec
            self.common = (f"Server: {SERVER_NAME}\r\nDate: "
                           f"{formatdate(sec, usegmt=True)}\r\n").encode()
            _prefixes.clear()
            _heads.clear()


clock = Clock()


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid status code {status}")
        line = STATUS_LINES[status] = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


def _ctype(ct: str) -> bytes:
    b = _ctype_cache.get(ct)
    if b is None:
        if "\r" in ct or "\n" in ct:
            raise ValueError("CR or LF in Content-Type")
        b = f"Content-Type: {ct}\r\n".encode("latin-1")
        if len(_ctype_cache) < 256:
            _ctype_cache[ct] = b
    return b


# names of header fields already checked, and not owned by the server
_good_names: set[str] = set()


def extra_headers(headers: dict[str, str]) -> bytes:
    """A handler's own headers, refusing CR/LF so nothing can split the response.

    Values are checked on every call, names once. The usual call (names seen
    before, str values) runs in C: one scan of the values joined, one join. Code whose header values it builds itself
    (numbers, fixed names) can pass `trusted` bytes instead (see
    Response.trusted_headers), or check a fixed set once with this function
    and keep the bytes."""
    if _good_names.issuperset(headers):
        try:
            values = "".join(headers.values())
        except TypeError:  # a value that is not a str
            return _checked(headers)
        if "\r" not in values and "\n" not in values:
            return ("\r\n".join(map(": ".join, headers.items())) + "\r\n").encode("latin-1")
    return _checked(headers)


def _checked(headers: dict[str, str]) -> bytes:
    """extra_headers, field by field: drops the server's own fields, names the bad one."""
    out = []
    for k, v in headers.items():
        if k.lower() in _MANAGED:
            continue
        v = str(v)
        if "\r" in k or "\n" in k or ":" in k or not k or "\r" in v or "\n" in v:
            raise ValueError(f"invalid header {k!r}")
        if len(_good_names) < 256:
            _good_names.add(k)
        out.append(f"{k}: {v}\r\n")
    return "".join(out).encode("latin-1")


def _prefix(status: int, content_type: str) -> bytes:
    p = status_line(status) + clock.common + (_ctype(content_type) if content_type else b"")
    if len(_prefixes) < 256:
        _prefixes[status, content_type] = p
    return p


def response_head(status: int, content_type: str, headers: dict[str, str] | None,
                  length: int, keep_alive: bool, http10: bool, trusted: bytes = b"") -> bytes:
    """Status line and headers of a response with a known length. `trusted`:
    header lines ("name: value\r\n" each) sent as they are, unchecked."""
    plain = not headers and not trusted
    if plain:  # most answers repeat within a second: reuse their head (see HEADS)
        head = _heads.get((status, content_type, length, keep_alive, http10))
        if head is not None:
            return head
    prefix = _prefixes.get((status, content_type)) or _prefix(status, content_type)
    head = b"%sContent-Length: %d\r\n%s%s%s\r\n" % (
        prefix, length, b"" if keep_alive and not http10 else _CONN[keep_alive, http10],
        extra_headers(headers) if headers else b"", trusted)
    if plain and len(_heads) < 1024:
        _heads[status, content_type, length, keep_alive, http10] = head
    return head


def bodyless_head(status: int, headers: dict[str, str] | None, keep_alive: bool,
                  http10: bool, trusted: bytes = b"") -> bytes:
    """The head of a 204 or 304 (RFC 9110 15.3.5, 15.4.5; RFC 9112 6.1): no
    Content-Length, Transfer-Encoding or Content-Type. A 304's length would
    have to be the one a 200 would carry, which the server does not know, so
    none is invented; its handler's own fields (ETag, Cache-Control, ...) go out."""
    return b"%s%s%s%s%s\r\n" % (
        status_line(status), clock.common,
        b"" if keep_alive and not http10 else _CONN[keep_alive, http10],
        extra_headers(headers) if headers else b"", trusted)


def stream_head(status: int, content_type: str, headers: dict[str, str] | None,
                keep_alive: bool, http10: bool, trusted: bytes = b"") -> bytes:
    """Head of a streamed response: chunked on HTTP/1.1, close-delimited on 1.0."""
    framing = b"Connection: close\r\n" if http10 else (
        b"Transfer-Encoding: chunked\r\n" + _CONN[keep_alive, False])
    return b"%s%s%s%s%s%s\r\n" % (status_line(status), clock.common, _ctype(content_type),
                                  framing, extra_headers(headers) if headers else b"", trusted)


def switch_head(accept: str, headers: dict[str, str] | None, trusted: bytes = b"") -> bytes:
    """The 101 that switches a connection to WebSocket (RFC 6455 4.2.2)."""
    return (b"HTTP/1.1 101 Switching Protocols\r\n" + clock.common +
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
            accept.encode("ascii") + b"\r\n" + (extra_headers(headers) if headers else b"") +
            trusted + b"\r\n")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (an empty `data` would end the body: never sent)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
