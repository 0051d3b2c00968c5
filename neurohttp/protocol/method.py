"""Telling an unknown method (501 Not Implemented) from a malformed request line
(400), whatever the TCP split: sans-IO helpers for protocol/h1.py.

llhttp knows a fixed list of methods and refuses any other with the same error
as garbage, without saying where it stopped. RFC 9110 9.1 wants 501 for a
method the server does not recognise, so the parser must look at the refused
request line itself: from the end of the last complete message (or the start
of the connection) to the first byte that is not a token character.

To find that start without keeping the connection's input, the parser keeps a
*resume prefix* between feeds: bytes that bring a fresh llhttp parser to the
state its own is in (the partial head or method so far, or a synthetic head
whose Content-Length is what the body in progress still lacks). On an
unknown method it replays the prefix and the refused feed through a scratch
parser to find where the last complete message ended. Chunked bodies have a
state no prefix can rebuild, so after a chunked request on a connection every
refused method is 400: the answer then depends only on the bytes, never on
how they were split.
"""

from __future__ import annotations

import re

import httptools

# RFC 9110 5.6.2 tchar; a method is a token
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")
# A well-formed request line (RFC 9112 3), with the runs of spaces llhttp accepts
_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ +[\x21-\x7e\x80-\xff]+ +HTTP/[0-9]\.[0-9]\r\n")
MAX_METHOD = 32       # longer than any registered method: 400 without waiting for the rest
# The bytes llhttp's method names are made of, and the spaces after one: a feed
# ending in one may end inside a request line whose target has not begun (the
# parser's phase is still IDLE), whose bytes the next feed needs.
METHOD_TAILS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ- ")  # (byte values)
_SLICE = 1024         # replay granularity (bytes fed at once before going byte by byte)


def verdict(line: bytes, max_line: int) -> int | None:
    """501 for a well-formed request line (`token SP target SP HTTP/x.y CRLF`), 400
    for anything else, None while the bytes so far could still be either. `line`
    starts at the refused message; a malformed start is refused without waiting."""
    n = _TOKEN.match(line).end()  # type: ignore[union-attr]  # (matches the empty string)
    if n > MAX_METHOD:
        return 400
    if n == len(line):
        return None  # the token may go on
    if n == 0 or line[n] != 0x20:
        return 400
    end = line.find(b"\n")
    if end < 0:
        return None if len(line) <= max_line else 400
    return 501 if _LINE.fullmatch(line, 0, end + 1) else 400


class _Count:
    """A scratch parser's protocol: it only counts complete messages."""

    def __init__(self) -> None:
        self.n = 0

    def on_message_complete(self) -> None:
        self.n += 1


def _scratch() -> tuple[httptools.HttpRequestParser, _Count]:
    count = _Count()
    p = httptools.HttpRequestParser(count)
    p.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)  # as H1Parser
    return p, count


def _feed(p: httptools.HttpRequestParser, data: bytes) -> bool:
    """Feed a scratch parser; False once it stops (what follows is not ours to parse)."""
    try:
        p.feed_data(data)
    except httptools.HttpParserError:
        return False
    return True


def message_end(buf: bytes, k: int) -> int:
    """The offset in `buf` just after its k-th complete message (k >= 1), or -1.

    `buf` is a resume prefix and the bytes after it, which the real parser
    parsed into at least k messages; a scratch parser counts them again, in
    slices, then byte by byte through the slice where the k-th one ends.
    """
    p, count = _scratch()
    pos = 0
    while count.n < k and pos < len(buf):
        ok = _feed(p, buf[pos:pos + _SLICE])
        pos += _SLICE
        if not ok:
            break
    if count.n < k:
        return -1
    lo = max(0, pos - _SLICE)
    p, count = _scratch()
    if lo and not _feed(p, buf[:lo]):
        return -1
    for i in range(lo, min(pos, len(buf))):
        if not _feed(p, buf[i:i + 1]):
            return -1
        if count.n >= k:
            return i + 1
    return -1


def body_prefix(remaining: int) -> bytes:
    """A head after which a fresh parser expects `remaining` body bytes, as the real
    one does in the middle of a Content-Length body."""
    return b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % remaining
