"""Fuzzing the HTTP/1.1 layer with hypothesis.

(a) The sans-IO parser: random and mutated request streams, split at random
    points, produce only Requests or HttpError (never another exception), and
    the outcome does not depend on the split.
(b) A live 2-worker server: the same inputs over real sockets. Every answer is a
    well-formed HTTP/1.1 response, the sequence of answers is what the parser
    oracle says (one per request in order, then the refusal, if any), and the
    workers stay up.
"""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server import Server, read_all

from neurohttp.messages import Request
from neurohttp.protocol.h1 import H1Parser, HttpError

MAX_HEAD = 16384   # the server's default
MAX_BODY = 4096    # small, so 413 happens often
REFUSALS = {400, 408, 413, 417, 431, 501, 505}

# ---------------------------------------------------------------- generators
METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT",
           b"TRACE", b"get", b"FOO", b"PRI", b""]
TARGETS = [b"/", b"/health", b"/stats", b"/v1/chat", b"/nope", b"*", b"http://h.example/health",
           b"https://h.example:8443/v1/chat?x=1", b"/a?b=c&d", b"/%2e%2e/%00%ff", b"//x//y",
           b"h.example:443", b"/caf\xc3\xa9", b"/" + b"a" * 300, b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9",
            b"HTTP/1.2", b"HTTP/1", b"http/1.1", b""]
BODIES = [b"", b'{"prompt":"hi"}', b'{"prompt":"hi","stream":true}', b'{"prompt":"\xff\xfe"}',
          b'{"prompt":', b"not json", b"\x00\x01\x02", b'{"prompt":"' + b"x" * 5000 + b'"}']
FIELDS = {
    b"Host": [b"h.example", b"", b"a b", b"h.example:80"],
    b"Connection": [b"close", b"keep-alive", b"upgrade", b"Keep-Alive, Upgrade", b"foo"],
    b"Expect": [b"100-continue", b"100-Continue ", b"nope"],
    b"Upgrade": [b"websocket", b"h2c", b"foo/1"],
    b"Accept": [b"text/event-stream", b"application/json", b"*/*"],
    b"Content-Type": [b"application/json", b"text/plain; charset=utf-8"],
    b"Transfer-Encoding": [b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b""],
    b"Content-Length": [b"0", b"5", b"-1", b"+5", b"1 2", b"99999999999999999999", b""],
    b"X-Test": [b"", b"v", b"caf\xc3\xa9", b"a\x00b", b"tab\tin", b"x" * 200],
}
SEPARATORS = [b": ", b":", b":   ", b" : ", b":\t"]


@st.composite
def request(draw) -> bytes:
    """One request, mostly well-formed: framing chosen to match or not match the body."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from(VERSIONS))
    line = b" ".join((method, target, version))
    fields: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)):
        fields.append((b"Host", b"h.example"))
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4)):
        fields.append((name, draw(st.sampled_from(FIELDS[name]))))
    body = draw(st.sampled_from(BODIES))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "wrong"]))
    raw_body = b""
    if framing == "length" and (body or draw(st.booleans())):
        fields.append((b"Content-Length", b"%d" % len(body)))
        raw_body = body
    elif framing == "wrong":
        fields.append((b"Content-Length", b"%d" % (len(body) + draw(st.integers(-3, 3)))))
        raw_body = body
    elif framing == "chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for part in parts:
            if part:
                ext = draw(st.sampled_from([b"", b";a=b", b";x", b' ;q="s"']))
                raw_body += b"%x%s\r\n%s\r\n" % (len(part), ext, part)
        raw_body += b"0\r\n"
        if draw(st.booleans()):
            raw_body += b"X-Trailer: t\r\n"
        raw_body += b"\r\n"
    fields = draw(st.permutations(fields))
    sep = draw(st.sampled_from(SEPARATORS))
    head = line + b"\r\n" + b"".join(n + sep + v + b"\r\n" for n, v in fields) + b"\r\n"
    return head + raw_body


MUTATION_BYTES = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b";", b"\x7f", b"\xff",
                  b"0", b"f", b"\r\n\r\n", b"\r\n "]


@st.composite
def mutated(draw, base) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        if op == "insert":
            data[i:i] = draw(st.sampled_from(MUTATION_BYTES))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 4))]
        elif op == "replace":
            data[i] = draw(st.integers(0, 255))
        else:
            del data[i:]
    return bytes(data)


streams = st.lists(request(), min_size=1, max_size=4).map(b"".join)
inputs = st.one_of(
    streams,
    mutated(streams),
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n", b"0\r\n",
                              b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n",
                              b"abc", b"\r", b"\n", b" ", b"POST /v1/chat HTTP/1.0\r\n"]),
             max_size=20).map(b"".join),
)


# ---------------------------------------------------------------- (a) the parser
def run_parser(data: bytes, cuts: list[int], max_head: int = MAX_HEAD,
               max_body: int = MAX_BODY) -> tuple:
    """Feed `data` split at `cuts`; return what came out, comparable across splits."""
    p = H1Parser("127.0.0.1", max_head, max_body, Request)
    reqs, status = [], None
    bounds = [0, *sorted(set(cuts)), len(data)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        try:
            reqs += p.feed(data[a:b], 0.0)
        except HttpError as e:  # anything else fails the test
            reqs += e.requests
            status = e.status
            break
    summary = [(r.method, r.target, r.version, tuple(r.raw_headers), r.body, r.keep_alive)
               for r in reqs]
    return summary, status, None if status else (p.phase, p.continue_pending)


def cut_points(data_strategy=inputs):
    return data_strategy.flatmap(lambda d: st.tuples(
        st.just(d), st.lists(st.integers(0, max(len(d), 0)), max_size=12)))


@settings(max_examples=600, deadline=None)
@given(cut_points())
def test_parser_outcome_does_not_depend_on_the_split(case):
    data, cuts = case
    whole = run_parser(data, [])
    assert run_parser(data, cuts) == whole
    assert run_parser(data, list(range(1, len(data)))) == whole  # byte by byte


@st.composite
def pipelines_with_unknown_methods(draw) -> bytes:
    """Known and unknown methods after bodies that end in method letters, chunked or
    not: where the refused request line starts depends on what came before it."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        method = draw(st.sampled_from([b"FOO", b"GE", b"GETX", b"get", b"M-SEARCH", b"POST",
                                       b"G@T", b"X" * 40, b"DESCRIBE"]))
        body = draw(st.sampled_from([b"", b"ABC", b"xGE", b"{}", b"PO ", b"a\r\n\r\nFOO / "]))
        if body and draw(st.booleans()):
            framing = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                len(body), body)
        else:
            framing = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        out += (method + draw(st.sampled_from([b" ", b"  "])) + b"/x HTTP/1.1\r\nHost: a\r\n"
                + framing + draw(st.sampled_from([b"", b"\r\n"])))
    return out


@settings(max_examples=400, deadline=None)
@given(cut_points(pipelines_with_unknown_methods()))
def test_unknown_method_answer_does_not_depend_on_the_split(case):
    """501 for an unknown method, 400 for a malformed one (protocol/method.py),
    whatever the split: the parser finds the refused request line by itself."""
    data, cuts = case
    whole = run_parser(data, [])
    assert run_parser(data, cuts) == whole
    assert run_parser(data, list(range(1, len(data)))) == whole


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"X-A", b"Cookie", b"X-Long-Header-Name"]),
                          st.integers(0, 120)), max_size=8),
       st.integers(0, 80), st.sampled_from(SEPARATORS[:3]),
       st.lists(st.integers(0, 2000), max_size=8))
def test_parser_head_limit_is_consistent(fields, url_len, sep, cuts):
    """Near max_header_bytes: a head that fits on the wire is never refused, however
    it is split; one over the budget is refused (431) or parsed as whole."""
    max_head = 256
    head = (b"GET /" + b"u" * url_len + b" HTTP/1.1\r\nHost: a\r\n"
            + b"".join(n + sep + b"v" * size + b"\r\n" for n, size in fields) + b"\r\n")
    whole = run_parser(head, [], max_head=max_head)
    split = run_parser(head, cuts, max_head=max_head)
    if len(head) <= max_head:
        assert whole[1] is None and split == whole
    else:
        assert split == whole or split[1] == 431
    fields_size = 1 + url_len + sum(len(n) + size + 3 for n, size in fields) + len(b"Host:a\r\n")
    if fields_size > max_head:
        assert whole[1] == 431 and split[1] == 431


# ---------------------------------------------------------------- (b) a live server
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("fuzz"), workers=2,
                 config={"server": {"max_body_bytes": MAX_BODY}}).start()
    pids = srv.worker_pids()
    yield srv
    try:
        assert srv.worker_pids() == pids, "a worker died during the fuzz run"
        assert srv.get_json("/health")["status"] == "ok"
        assert srv.stop() == 0, srv.log()
        assert "Traceback" not in srv.log(), srv.log()
    finally:
        srv.kill()


def oracle(data: bytes) -> tuple[list[str], int | None]:
    """The methods the server must answer, in order, then the refusal it must send."""
    p = H1Parser("127.0.0.1", MAX_HEAD, MAX_BODY, Request)
    status = None
    try:
        reqs = p.feed(data, 0.0)
    except HttpError as e:
        reqs, status = e.requests, e.status
    methods = []
    for r in reqs:
        methods.append(r.method)
        if not r.keep_alive:
            return methods, None  # nothing after a closing request is read
    return methods, status


TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_strict(data: bytes, methods: list[str]) -> list[tuple[int, dict[bytes, bytes]]]:
    """Split a byte stream into responses, failing on anything not well-formed."""
    out: list[tuple[int, dict[bytes, bytes]]] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:300]!r}"
        line, *lines = head.split(b"\r\n")
        m = re.fullmatch(rb"HTTP/1\.1 ([1-5]\d\d) [ -~]+", line)
        assert m, f"bad status line {line!r}"
        status = int(m[1])
        fields: dict[bytes, bytes] = {}
        for f in lines:
            name, colon, value = f.partition(b":")
            assert colon and TOKEN.fullmatch(name), f"bad field {f!r}"
            assert name.lower() not in fields, f"repeated field {name!r}"
            fields[name.lower()] = value.strip()
        data = rest
        if status == 100:
            assert not fields
            continue
        assert fields.get(b"server", b"").startswith(b"NeuroHTTP/") and b"date" in fields
        method = methods[len(out)] if len(out) < len(methods) else "GET"
        if method == "HEAD" or status in (204, 304):
            pass
        elif fields.get(b"transfer-encoding") == b"chunked":
            assert b"content-length" not in fields
            while True:
                size_line, crlf, data = data.partition(b"\r\n")
                assert crlf and re.fullmatch(rb"[0-9a-f]+", size_line), size_line
                size = int(size_line, 16)
                if size == 0:
                    assert data[:2] == b"\r\n"
                    data = data[2:]
                    break
                assert data[size:size + 2] == b"\r\n"
                data = data[size + 2:]
        elif b"content-length" in fields:
            n = int(fields[b"content-length"])
            assert len(data) >= n, "truncated body"
            data = data[n:]
        else:  # close-delimited (an HTTP/1.0 stream): the rest is the body
            assert fields.get(b"connection") == b"close"
            data = b""
        out.append((status, fields))
    return out


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(inputs)
def test_live_server_answers_every_input_well(live, data):
    methods, refusal = oracle(data)
    with socket.create_connection((live.host, live.port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # half-close: the server answers what it has, then closes
        answer = read_all(s, 10)
    responses = parse_strict(answer, methods)
    expected = [None] * len(methods) + ([refusal] if refusal else [])
    for i, (status, fields) in enumerate(responses):
        assert i < len(expected), f"unexpected extra response {status}"
        if status == 408 and i == len(responses) - 1:
            pass  # a starved server may time the client out; it must be the last word
        elif expected[i] is None:
            assert 200 <= status < 300 or 400 <= status < 500, status
        else:
            assert status == expected[i] and status in REFUSALS
        if fields.get(b"connection") == b"close":
            assert i == len(responses) - 1, "bytes after a closing response"
    closed_early = responses and responses[-1][1].get(b"connection") == b"close"
    if not closed_early:
        assert len(responses) == len(expected), (responses, expected)
    else:
        assert len(responses) <= len(expected)
