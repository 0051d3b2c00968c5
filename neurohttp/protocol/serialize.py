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
# (status, content type, length, keep-alive, HTTP/1.0) -> whole head, for this second
_heads: dict[tuple[int, str, int, bool, bool], bytes] = {}


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


def extra_headers(headers: dict[str, str]) -> bytes:
    """A handler's own headers, refusing CR/LF so nothing can split the response."""
    out = []
    for k, v in headers.items():
        if k.lower() in _MANAGED:
            continue
        v = str(v)
        if "\r" in k or "\n" in k or ":" in k or "\r" in v or "\n" in v:
            raise ValueError(f"invalid header {k!r}")
        out.append(f"{k}: {v}\r\n")
    return "".join(out).encode("latin-1")


def _prefix(status: int, content_type: str) -> bytes:
    p = status_line(status) + clock.common + (_ctype(content_type) if content_type else b"")
    if len(_prefixes) < 256:
        _prefixes[status, content_type] = p
    return p


def response_head(status: int, content_type: str, headers: dict[str, str] | None,
                  length: int, keep_alive: bool, http10: bool) -> bytes:
    """Status line and headers of a response with a known length."""
    if headers is None:  # most answers repeat within a second: reuse their head
        head = _heads.get((status, content_type, length, keep_alive, http10))
        if head is not None:
            return head
    prefix = _prefixes.get((status, content_type)) or _prefix(status, content_type)
    head = b"%sContent-Length: %d\r\n%s%s\r\n" % (
        prefix, length, b"" if keep_alive and not http10 else _CONN[keep_alive, http10],
        extra_headers(headers) if headers else b"")
    if headers is None and len(_heads) < 1024:
        _heads[status, content_type, length, keep_alive, http10] = head
    return head


def stream_head(status: int, content_type: str, headers: dict[str, str] | None,
                keep_alive: bool, http10: bool) -> bytes:
    """Head of a streamed response: chunked on HTTP/1.1, close-delimited on 1.0."""
    framing = b"Connection: close\r\n" if http10 else (
        b"Transfer-Encoding: chunked\r\n" + _CONN[keep_alive, False])
    return b"%s%s%s%s%s\r\n" % (status_line(status), clock.common, _ctype(content_type),
                                framing, extra_headers(headers) if headers else b"")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (an empty `data` would end the body: never sent)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
