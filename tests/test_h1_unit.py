"""Sans-IO unit tests of the HTTP/1.1 parser (protocol/h1.py) and serialiser
(protocol/serialize.py): bytes in, requests or errors out; parts in, bytes out."""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime

import pytest

from neurohttp import SERVER_NAME
from neurohttp.messages import Request
from neurohttp.protocol import serialize as ser
from neurohttp.protocol.h1 import (
    PHASE_BODY,
    PHASE_DONE,
    PHASE_HEAD,
    PHASE_IDLE,
    H1Parser,
    HttpError,
)

MAX_HEAD = 1024
MAX_BODY = 4096


def parser(max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> H1Parser:
    return H1Parser("10.0.0.1", max_head, max_body, Request)


def feed_all(data: bytes, sizes: int | None = None, p: H1Parser | None = None):
    """Feed `data` whole (sizes=None) or in pieces of `sizes` bytes; return the requests."""
    p = p or parser()
    if sizes is None:
        return p.feed(data, 1.0)
    out = []
    for i in range(0, len(data), sizes):
        out += p.feed(data[i:i + sizes], 1.0)
    return out


def error_of(data: bytes, sizes: int | None = None, **kw) -> HttpError:
    p = parser(**kw)
    with pytest.raises(HttpError) as ei:
        feed_all(data, sizes, p)
    assert p.phase == PHASE_DONE  # nothing more is parsed after an error
    assert p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 2.0) == []
    return ei.value


GET = b"GET /health?x=1 HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n"


# ---------------------------------------------------------------- requests out
def test_simple_get():
    [r] = feed_all(GET)
    assert (r.method, r.target, r.version, r.body, r.client) == (
        "GET", b"/health?x=1", "1.1", b"", "10.0.0.1")
    assert r.path == "/health" and r.query == {"x": "1"}
    assert r.raw_headers == [(b"Host", b"example"), (b"Accept", b"*/*")]
    assert r.headers["host"] == "example" and r.keep_alive


@pytest.mark.parametrize("sizes", [None, 1, 7])
def test_pipelined_requests_in_order_whatever_the_split(sizes):
    data = GET + b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" + GET
    reqs = feed_all(data, sizes)
    assert [(r.method, r.body) for r in reqs] == [("GET", b""), ("POST", b"hello"), ("GET", b"")]


def test_content_length_body_across_feeds():
    p = parser()
    assert p.feed(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234", 1.0) == []
    assert p.phase == PHASE_BODY and p.body_started == 1.0
    [r] = p.feed(b"56789", 2.0)
    assert r.body == b"0123456789" and p.phase == PHASE_IDLE


@pytest.mark.parametrize("sizes", [None, 1, 5])
def test_chunked_body_with_extensions_and_trailers(sizes):
    data = (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value;flag\r\nhello\r\n6\r\n world\r\n0;last=1\r\n"
            b"X-Checksum: abc\r\nX-Other: 1\r\n\r\n")
    [r] = feed_all(data, sizes)
    assert r.body == b"hello world"
    # trailer fields are accepted and dropped: they never become request headers
    assert [n for n, _ in r.raw_headers] == [b"Host", b"Transfer-Encoding"]


def test_keep_alive_rules():
    def ka(req: bytes) -> bool:
        [r] = feed_all(req)
        return r.keep_alive
    assert ka(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not ka(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not ka(b"GET / HTTP/1.0\r\n\r\n")
    assert ka(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")


def test_http10_without_host_is_fine():
    [r] = feed_all(b"GET / HTTP/1.0\r\n\r\n")
    assert r.version == "1.0"


def test_head_and_phase_timestamps():
    # (the head's deadline runs from the connection's idle clock: worker/connection.py)
    p = parser()
    assert p.phase == PHASE_IDLE
    p.feed(b"GET / HT", 5.0)
    assert p.phase == PHASE_HEAD
    [r] = p.feed(b"TP/1.1\r\nHost: a\r\n\r\n", 6.0)
    assert r.method == "GET" and p.phase == PHASE_IDLE


def test_leading_empty_lines_are_skipped():
    [r] = feed_all(b"\r\n\r\n" + GET)  # RFC 9112 2.2: ignore at least one empty line
    assert r.target == b"/health?x=1"


def test_odd_targets_are_kept_verbatim():
    [a, b, c] = feed_all(b"GET http://Example.COM:80/health?q=%41 HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /a%20b/../c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert a.target == b"http://Example.COM:80/health?q=%41" and a.path == "/health"
    assert a.query == {"q": "A"}
    assert b.target == b"*" and b.path == "*"
    assert c.path == "/a b/../c"  # decoded, never resolved: routes match exactly


def test_obs_text_in_a_value_is_kept():
    [r] = feed_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9\r\n\r\n")
    assert r.headers["x-name"] == "caf\xe9"


# ---------------------------------------------------------------- Expect
def test_expect_100_continue_pending_until_body():
    p = parser()
    assert p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue \r\n"
                  b"Content-Length: 3\r\n\r\n", 1.0) == []
    assert p.continue_pending
    [r] = p.feed(b"abc", 1.0)
    assert r.body == b"abc" and not p.continue_pending


def test_expect_without_body_needs_no_continue():
    p = parser()
    [r] = p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", 1.0)
    assert not p.continue_pending


def test_expect_other_value_is_417():
    e = error_of(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx")
    assert e.status == 417


def test_expect_with_too_large_length_is_413_before_the_body():
    e = error_of(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 4097\r\n\r\n")
    assert e.status == 413


# ---------------------------------------------------------------- limits
def test_content_length_over_limit_is_413_from_the_head_alone():
    assert error_of(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4097\r\n\r\n").status == 413
    [r] = feed_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096)
    assert len(r.body) == 4096


@pytest.mark.parametrize("sizes", [None, 100])
def test_chunked_body_over_limit_is_413(sizes):
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 5
    assert error_of(data, sizes).status == 413


def test_huge_declared_chunk_size_is_413_once_the_data_passes_the_limit():
    p = parser()
    assert p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"7fffffffffffffff\r\n" + b"x" * MAX_BODY, 1.0) == []  # nothing buffered past it
    with pytest.raises(HttpError) as ei:
        p.feed(b"x", 1.0)
    assert ei.value.status == 413


@pytest.mark.parametrize("sizes", [None, 64])
def test_one_huge_header_is_431(sizes):
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 2000 + b"\r\n\r\n"
    assert error_of(data, sizes).status == 431


@pytest.mark.parametrize("sizes", [None, 64])
def test_many_headers_are_431(sizes):
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
    assert error_of(data, sizes).status == 431


@pytest.mark.parametrize("tail", [b" HTTP/1.1\r\n\r\n", b" HTTP/1.0\r\n\r\n", b""])
def test_huge_request_line_is_431(tail):
    # the request line shares the head's budget; HTTP/1.0 has no Host header to trip on
    assert error_of(b"GET /" + b"a" * 2000 + tail).status == 431


@pytest.mark.parametrize("pipelined", [False, True])
def test_big_header_finished_by_a_small_read_is_431(pipelined):
    # httptools holds the unfinished value, so the first read's callbacks see little
    # of it; the small read that completes the head must still be refused
    p = parser()
    first = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 3 if pipelined else b""
    done = p.feed(first + b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * (MAX_HEAD - 10), 1.0)
    assert len(done) == (3 if pipelined else 0)
    with pytest.raises(HttpError) as ei:
        p.feed(b"vvvvvvvvvvvvvvvvvvvv\r\n\r\n", 1.0)
    assert ei.value.status == 431


def test_head_at_the_limit_in_one_read_is_served():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
    data = head + b"v" * (MAX_HEAD - len(head) - 4) + b"\r\n\r\n"
    assert len(data) == MAX_HEAD
    assert len(parser().feed(data, 1.0)) == 1


def test_incomplete_head_is_bounded_chunk_by_chunk():
    p = parser()
    p.feed(b"GET / HTTP/1.1\r\nX-Slow: ", 1.0)
    with pytest.raises(HttpError) as ei:
        for _ in range(100):
            p.feed(b"a" * 100, 1.0)  # the value never ends: httptools would buffer it all
    assert ei.value.status == 431


def test_trailer_flood_is_bounded():
    p = parser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"1\r\nx\r\n0\r\nX-Trailer: ", 1.0)
    with pytest.raises(HttpError) as ei:
        for _ in range(100):
            p.feed(b"t" * 100, 1.0)
    assert ei.value.status == 431


def test_chunk_extension_flood_is_bounded():
    p = parser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=", 1.0)
    with pytest.raises(HttpError) as ei:
        for _ in range(100):
            p.feed(b"e" * 100, 1.0)
    assert ei.value.status == 431


def test_many_small_chunks_are_not_framing_abuse():
    # 4000 one-byte chunks: 5x more framing than body, fed as a client streams them
    p = parser(max_head=256, max_body=8192)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 1.0)
    for _ in range(4000):
        assert p.feed(b"1\r\nx\r\n", 1.0) == []
    [r] = p.feed(b"0\r\n\r\n", 1.0)
    assert r.body == b"x" * 4000


def test_head_budget_counts_no_more_than_the_wire():
    # 1022 bytes on the wire against a 1024-byte budget: accepted, however it is split
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 990 + b"\r\n\r\n"
    assert len(head) <= MAX_HEAD
    for sizes in (None, 1, 10, 100):
        assert len(feed_all(head, sizes)) == 1


# ---------------------------------------------------------------- strict parsing
BAD = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_content_lengths": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                           b"Content-Length: 3\r\n\r\nabc",
    "content_length_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "content_length_sign": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "content_length_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: "
                               b"99999999999999999999999\r\n\r\n",
    "te_not_final_chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip"
                            b"\r\n\r\n",
    "te_gzip": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    "te_twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "te_in_http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk_size_invalid": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk_size_negative": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"-3\r\nabc\r\n0\r\n\r\n",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"ffffffffffffffffffff\r\n",
    "chunk_line_invalid": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nabcXY\r\n0\r\n\r\n",
    "chunk_lf_only": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\nabc\n0\n\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: one\r\n two\r\n\r\n",
    "obs_fold_tab": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: one\r\n\ttwo\r\n\r\n",
    "bare_cr_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
    "bare_cr_line_end": b"GET / HTTP/1.1\rHost: a\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bad_request_line": b"GARBAGE\r\n\r\n",
    "method_then_slash": b"GET/health HTTP/1.1\r\nHost: a\r\n\r\n",
    "method_then_tab": b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "at_sign_in_method": b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "no_method": b" / HTTP/1.1\r\nHost: a\r\n\r\n",
    "endless_method": b"X" * 40 + b" / HTTP/1.1\r\nHost: a\r\n\r\n",
    "unknown_method_no_version": b"BROKEN LINE\r\n\r\n",
    "unknown_method_bare_lf": b"FOO / HTTP/1.1\nHost: a\n\n",
    "unknown_method_bad_version": b"FOO / HTTX/1.1\r\nHost: a\r\n\r\n",
    "binary": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "extra_token_in_request_line": b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
    "space_in_target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "nul_in_target": b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n",
    "bad_version_token": b"GET / HTTX/1.1\r\nHost: a\r\n\r\n",
    "no_version": b"GET /\r\nHost: a\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    "control_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n",
    "del_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n",
    "nul_in_name": b"GET / HTTP/1.1\r\nHost: a\r\nX\x00A: b\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
    "tab_before_colon": b"GET / HTTP/1.1\r\nHost: a\r\nX-A\t: b\r\n\r\n",
    "empty_name": b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n",
    "no_colon": b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "chunked_upgrade": b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("sizes", [None, 1])
def test_bad_input_is_400(name, sizes):
    assert error_of(BAD[name], sizes).status == 400


@pytest.mark.parametrize("data", [b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
                                  b"GET / HTTP/3.0\r\nHost: a\r\n\r\n",
                                  b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
                                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])  # h2 prior knowledge
@pytest.mark.parametrize("sizes", [None, 1])
def test_unsupported_version_is_505(data, sizes):
    assert error_of(data, sizes).status == 505


UNKNOWN_METHODS = [b"FOO / HTTP/1.1", b"get / HTTP/1.1", b"GETX / HTTP/1.1", b"BREW /pot HTTP/1.1",
                   b"GE / HTTP/1.1", b"M-SEARCHX * HTTP/1.1", b"DESCRIBE / HTTP/1.1",
                   b"X" * 32 + b" / HTTP/1.1"]
BEFORE = [b"", GET, GET + b"\r\n",
          b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nABGE",
          b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 900 + b"\r\n\r\n"]


@pytest.mark.parametrize("line", UNKNOWN_METHODS)
@pytest.mark.parametrize("before", range(len(BEFORE)))
@pytest.mark.parametrize("sizes", [None, 1, 7, 1000])
def test_unknown_method_is_501_whatever_came_before_and_the_split(line, before, sizes):
    # RFC 9110 9.1: a method the server does not recognise (methods are case-sensitive)
    data = BEFORE[before] + line + b"\r\nHost: a\r\n\r\n"
    p = parser()
    got = []
    with pytest.raises(HttpError) as ei:
        for i in range(0, len(data), sizes or len(data)):
            got += p.feed(data[i:i + (sizes or len(data))], 1.0)
    assert ei.value.status == 501
    assert len(got + ei.value.requests) == (1 if before else 0)


def test_unknown_method_waits_for_the_end_of_its_token():
    p = parser()
    assert p.feed(b"BRE", 1.0) == [] and p.feed(b"WING", 1.0) == []  # still a token
    with pytest.raises(HttpError) as ei:
        p.feed(b" / HTTP/1.1\r\n", 1.0)
    assert ei.value.status == 501


def test_after_a_chunked_request_an_unknown_method_is_400():
    # a chunked body's state cannot be rebuilt to find the next request line (method.py)
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n"
            b"0\r\n\r\nFOO / HTTP/1.1\r\nHost: a\r\n\r\n")
    for sizes in (None, 1, 5):
        e = error_of(data, sizes)
        assert e.status == 400


@pytest.mark.parametrize("te", [b"Transfer-Encoding: gzip, chunked\r\n",
                                b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                                b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n"])
def test_unsupported_transfer_coding_is_501(te):
    # "gzip, chunked" is valid HTTP, but we would hand the handler undecoded gzip;
    # the same codings on two lines are the same list (RFC 9110 5.3): the same answer
    e = error_of(b"POST / HTTP/1.1\r\nHost: a\r\n" + te + b"\r\n0\r\n\r\n")
    assert e.status == 501


@pytest.mark.parametrize("te", [b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
                                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                                b"Transfer-Encoding: chunked, chunked\r\n",
                                b"Transfer-Encoding: gzip\r\n"])
@pytest.mark.parametrize("sizes", [None, 1])
def test_transfer_codings_not_ending_in_one_chunked_are_400(te, sizes):
    assert error_of(b"POST / HTTP/1.1\r\nHost: a\r\n" + te + b"\r\n0\r\n\r\n",
                    sizes).status == 400


@pytest.mark.parametrize("size_line", [b"5 ;a=b", b"5\t;a", b"5  ;a", b"5 "])
@pytest.mark.parametrize("sizes", [None, 1])
def test_whitespace_after_a_chunk_size_is_accepted(size_line, sizes):
    # RFC 9112 7.1.1: chunk-ext = *( BWS ";" ...): the size itself stays strict
    [r] = feed_all(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + size_line + b"\r\nhello\r\n0 \r\n\r\n", sizes)
    assert r.body == b"hello"


@pytest.mark.parametrize("size_line", [b"5 5", b"5 x", b" 5", b"5;a b", b"0x5"])
def test_a_chunk_size_is_still_hex_digits_only(size_line):
    assert error_of(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + size_line + b"\r\nhello\r\n0\r\n\r\n").status == 400


@pytest.mark.parametrize("sizes", [None, 1])
def test_asterisk_target_is_only_for_options(sizes):
    [r] = feed_all(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", sizes)
    assert r.target == b"*"
    for method in (b"GET", b"POST", b"HEAD"):
        assert error_of(method + b" * HTTP/1.1\r\nHost: a\r\n\r\n", sizes).status == 400


def test_partial_request_is_what_was_parsed():
    p = parser()
    assert p.partial_request() is None
    p.feed(b"POST /v1/chat HTTP/1.1\r\nHost: a\r\n", 1.0)
    assert p.partial_request().path == "/v1/chat"
    p.feed(b"Content-Length: 10\r\n\r\n{", 1.0)
    r = p.partial_request()
    assert r.path == "/v1/chat" and r.headers["content-length"] == "10"


@pytest.mark.parametrize("sizes", [None, 1, 3])
def test_requests_before_an_error_come_with_it(sizes):
    data = GET + GET + b"BROKEN\r\n\r\n"
    p = parser()
    got = []
    with pytest.raises(HttpError) as ei:
        for i in range(0, len(data), sizes or len(data)):
            got += p.feed(data[i:i + (sizes or len(data))], 1.0)
    got += ei.value.requests
    assert [r.target for r in got] == [b"/health?x=1"] * 2 and ei.value.status == 400


def test_data_after_connection_close_is_not_parsed():
    e = error_of(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET)
    assert [r.keep_alive for r in e.requests] == [False]  # the caller answers it, then closes


def test_error_carries_the_refused_request_as_far_as_parsed():
    e = error_of(b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nAccept: application/json\r\n"
                 b"Content-Length: 5000\r\n\r\n")
    assert e.request.path == "/v1/chat" and e.request.headers["accept"] == "application/json"
    assert error_of(b"BROKEN\r\n\r\n").request is None  # nothing usable was parsed


# ---------------------------------------------------------------- Upgrade / CONNECT
def test_upgrade_hands_over_request_and_rest():
    p = parser()
    [r] = p.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket"
                 b"\r\n\r\n\x81\x00", 1.0)
    assert not r.keep_alive
    req, rest = p.take_upgrade()
    assert req is r and rest == b"\x81\x00"
    assert p.feed(b"more", 1.0) == [] and p.phase == PHASE_DONE


@pytest.mark.parametrize("sizes", [None, 1])
def test_upgrade_with_body_is_answered_as_plain_http(sizes):
    data = (b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
            b"Content-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    p = parser()
    [r] = feed_all(data, sizes, p)
    assert r.body == b"abc" and not r.keep_alive and p.upgrade is None


def test_connect_is_a_plain_request_then_nothing():
    p = parser()
    [r] = p.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n"
                 b"\x16\x03\x01", 1.0)
    assert r.method == "CONNECT" and r.target == b"example.com:443" and not r.keep_alive
    assert p.feed(GET, 1.0) == []


# ---------------------------------------------------------------- serialize
def test_status_lines():
    assert ser.status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert ser.status_line(431) == b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    assert ser.status_line(599) == b"HTTP/1.1 599 Unknown\r\n"
    with pytest.raises(ValueError):
        ser.status_line(42)


def test_clock_server_and_date():
    c = ser.Clock()
    c.tick(1_700_000_000.2)
    first = c.common
    assert first.startswith(f"Server: {SERVER_NAME}\r\nDate: ".encode())
    date = re.search(rb"Date: (.+)\r\n", first).group(1).decode()
    assert parsedate_to_datetime(date).timestamp() == 1_700_000_000
    assert date.endswith(" GMT")
    c.tick(1_700_000_000.9)
    assert c.common is first  # same second: not rebuilt
    c.tick(1_700_000_001.0)
    assert c.common != first


def parse_head(data: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    line, *fields = head.split(b"\r\n")
    return line, dict(f.split(b": ", 1) for f in fields), body


@pytest.mark.parametrize("keep,http10,conn", [
    (True, False, None), (False, False, b"close"), (True, True, b"keep-alive"),
    (False, True, b"close")])
def test_response_head(keep, http10, conn):
    data = ser.response_head(200, "application/json", {"X-Id": "7"}, 12, keep, http10)
    line, fields, body = parse_head(data)
    assert line == b"HTTP/1.1 200 OK" and body == b""
    assert fields[b"Content-Length"] == b"12" and fields[b"Content-Type"] == b"application/json"
    assert fields[b"Server"] == SERVER_NAME.encode() and b"Date" in fields
    assert fields.get(b"Connection") == conn and fields[b"X-Id"] == b"7"


def test_handler_cannot_override_framing_or_split_the_response():
    data = ser.response_head(200, "text/plain", {"Content-Length": "999", "Connection": "x",
                                                 "Transfer-Encoding": "chunked"}, 3, True, False)
    _, fields, _ = parse_head(data)
    assert fields[b"Content-Length"] == b"3" and b"Transfer-Encoding" not in fields
    assert b"Connection" not in fields
    for bad in ({"X-A": "a\r\nSet-Cookie: x"}, {"X-A\r\nB": "1"}, {"X:A": "1"}):
        with pytest.raises(ValueError):
            ser.response_head(200, "text/plain", bad, 0, True, False)
    with pytest.raises(ValueError):
        ser.response_head(200, "text/plain\r\nX: y", None, 0, True, False)


def test_header_checks_hold_once_the_names_are_known():
    """Names are checked once and values on every call (extra_headers' fast
    path): a known name with a CR or LF in its value is still refused."""
    ok = {"X-Rate": "59", "X-Reset": "1s"}
    assert ser.extra_headers(ok) == b"X-Rate: 59\r\nX-Reset: 1s\r\n"
    assert ser.extra_headers(ok) == b"X-Rate: 59\r\nX-Reset: 1s\r\n"  # (now by the fast path)
    for value in ("1\r\nSet-Cookie: x", "1\n", "\r"):
        with pytest.raises(ValueError, match="X-Rate"):
            ser.extra_headers({"X-Reset": "1s", "X-Rate": value})
    assert ser.extra_headers({"X-Rate": 59, "X-Reset": 1.5}) == b"X-Rate: 59\r\nX-Reset: 1.5\r\n"
    assert ser.extra_headers({"X-Rate": "1", "content-length": "9"}) == b"X-Rate: 1\r\n"
    assert ser.extra_headers({"X-Tab": "a\tb"}) == b"X-Tab: a\tb\r\n"  # (HTAB is allowed)


def test_bodyless_and_switching_heads():
    _, f, _ = parse_head(ser.bodyless_head(304, {"ETag": '"x"'}, True, False, b"X-T: 1\r\n"))
    assert f == {b"Server": SERVER_NAME.encode(), b"Date": f[b"Date"], b"ETag": b'"x"',
                 b"X-T": b"1"}
    _, f, _ = parse_head(ser.bodyless_head(204, None, False, False))
    assert f[b"Connection"] == b"close" and b"Content-Length" not in f
    line, f, _ = parse_head(ser.switch_head("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", {"X-A": "1"}))
    assert line == b"HTTP/1.1 101 Switching Protocols" and f[b"Upgrade"] == b"websocket"
    assert f[b"Sec-WebSocket-Accept"] == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" and f[b"X-A"] == b"1"


def test_stream_head_chunked_or_close_delimited():
    _, f11, _ = parse_head(ser.stream_head(200, "application/x-ndjson", None, True, False))
    assert f11[b"Transfer-Encoding"] == b"chunked" and b"Connection" not in f11
    assert b"Content-Length" not in f11
    _, fclose, _ = parse_head(ser.stream_head(200, "text/event-stream", None, False, False))
    assert fclose[b"Transfer-Encoding"] == b"chunked" and fclose[b"Connection"] == b"close"
    _, f10, _ = parse_head(ser.stream_head(200, "text/plain", None, True, True))
    assert b"Transfer-Encoding" not in f10 and f10[b"Connection"] == b"close"


def test_chunk_framing_round_trips_through_the_parser():
    body = [b"hello", b" ", b"x" * 300]
    wire = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(ser.chunk(b) for b in body) + ser.LAST_CHUNK)
    assert ser.chunk(b"x" * 300).startswith(b"12c\r\n")
    [r] = feed_all(wire)
    assert r.body == b"".join(body)
