"""Split invariance of the upstream client's sans-IO parsers (hypothesis), as
tests/test_fuzz.py does for the server's request parser: the same bytes give
the same events and the same error kind however TCP cuts them, and nothing
but events or UpstreamError ever comes out."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurohttp.upstream.errors import UpstreamError
from neurohttp.upstream.h1_client import EndOfMessage, ResponseHead, ResponseParser
from neurohttp.upstream.sse import SSEDecoder

MAX_HEAD = 2048

INTERIMS = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 102 Processing\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
            b"HTTP/1.1 199 Misc\r\nX-A: 1\r\n\r\n"]
STATUSES = [200, 200, 201, 204, 304, 400, 404, 429, 500, 503]
BODIES = [b"", b"x", b'{"ok":true}', b"data: {\"a\":1}\n\n", b"\r\n\r\n0\r\n\r\n", b"z" * 3000]
FIELDS = [(b"Content-Type", b"application/json"), (b"Server", b"fake"), (b"X-Empty", b""),
          (b"Retry-After", b"3"), (b"Set-Cookie", b"a=b; Path=/"), (b"X-Long", b"v" * 300)]


@st.composite
def response(draw, last: bool) -> tuple[bool, bytes]:
    """(request was HEAD, the response bytes): mostly well-formed."""
    head_request = draw(st.integers(0, 5)) == 0
    out = b"".join(draw(st.lists(st.sampled_from(INTERIMS), max_size=2)))
    status = draw(st.sampled_from(STATUSES))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=3))
    conn = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, foo"]))
    if conn:
        fields.append((b"Connection", conn))
    body = draw(st.sampled_from(BODIES))
    framings = ["length", "chunked"] + (["close"] if last else [])
    framing = draw(st.sampled_from(framings))
    no_body = head_request or status in (204, 304)
    raw_body = b""
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % len(body)))
        raw_body = body
    elif framing == "chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
            if b > a:
                raw_body += b"%x%s\r\n%s\r\n" % (b - a, draw(st.sampled_from([b"", b";e=1"])),
                                                body[a:b])
        raw_body += b"0\r\n" + draw(st.sampled_from([b"", b"X-T: 1\r\n"])) + b"\r\n"
    else:
        raw_body = body
    if no_body:
        raw_body = b""
    fields = draw(st.permutations(fields))
    out += b"%s %d Reason\r\n" % (version, status)
    out += b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n" + raw_body
    return head_request, out


@st.composite
def exchanges(draw) -> list[tuple[bool, bytes]]:
    n = draw(st.integers(1, 3))
    return [draw(response(last=i == n - 1)) for i in range(n)]


MUTATIONS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b";", b"0", b"f", b"\r\n\r\n",
             b"HTTP/1.1 200 OK\r\n"]


@st.composite
def mutated(draw) -> list[tuple[bool, bytes]]:
    ex = draw(exchanges())
    i = draw(st.integers(0, len(ex) - 1))
    head_request, data = ex[i]
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        k = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        if op == "insert":
            data[k:k] = draw(st.sampled_from(MUTATIONS))
        elif op == "delete":
            del data[k:k + draw(st.integers(1, 4))]
        elif op == "replace":
            data[k] = draw(st.integers(0, 255))
        else:
            del data[k:]
    ex[i] = (head_request, bytes(data))
    return ex[:i + 1]


def run(ex: list[tuple[bool, bytes]], cuts: list[int]) -> tuple:
    """Each response fed in pieces cut at `cuts` (offsets into it), then EOF after
    the last; the events and the error kind, comparable across splits."""
    p = ResponseParser(max_head_bytes=MAX_HEAD)
    events: list = []
    kind = None
    try:
        for n, (head_request, data) in enumerate(ex):
            if p.state != 0 or (events and not events[-1].keep_alive):
                break  # the previous response did not end, or ended the connection
            p.expect(head_request)
            bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
            for a, b in zip(bounds, bounds[1:], strict=False):
                try:
                    events += p.feed(data[a:b])
                except UpstreamError as e:
                    events += getattr(e, "events", [])
                    raise
            if n == len(ex) - 1 and p.state != 0:
                events += p.feed_eof()
    except UpstreamError as e:
        kind = e.kind
    out: list = []
    if kind == "protocol" and events and isinstance(events[-1], EndOfMessage):
        # bytes after a complete response: in the same read they make its End
        # keep_alive=False; in a later read (no response due) they are an error.
        # Both say the same: the response is whole, the connection is not reused.
        events[-1] = EndOfMessage(False)
        kind = None
    for ev in events:
        if isinstance(ev, ResponseHead):
            out.append((ev.status, ev.raw))
        elif isinstance(ev, EndOfMessage):
            out.append(("end", ev.keep_alive))
        elif out and isinstance(out[-1], bytes):
            out[-1] += ev
        else:
            assert isinstance(ev, bytes) and ev
            out.append(ev)
    return out, kind


def cases(strategy):
    return strategy.flatmap(lambda ex: st.tuples(st.just(ex),
                                                 st.lists(st.integers(0, 4000), max_size=8)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(exchanges()))
def test_responses_do_not_depend_on_the_split(case):
    ex, cuts = case
    whole = run(ex, [])
    assert whole[1] is None, whole  # well-formed: no error
    assert run(ex, cuts) == whole
    longest = max(len(d) for _, d in ex)
    assert run(ex, list(range(1, longest))) == whole  # byte by byte


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(mutated()))
def test_mutated_responses_give_events_or_upstream_errors_whatever_the_split(case):
    ex, cuts = case
    whole = run(ex, [])
    assert run(ex, cuts) == whole
    longest = max(len(d) for _, d in ex)
    assert run(ex, list(range(1, longest))) == whole


# ---------------------------------------------------------------- SSE
SSE_LINES = [b"data: {\"a\":1}", b"data:x", b"data", b"data: ", b": ping", b":", b"event: e",
             b"id: 7", b"id: a\x00b", b"retry: 100", b"retry: x", b"other: y", b"data: [DONE]",
             b"data:  two spaces", "data: caf\u00e9".encode()]
ENDINGS = [b"\n", b"\r\n", b"\r"]


@st.composite
def sse_stream(draw) -> bytes:
    out = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    for _ in range(draw(st.integers(0, 6))):
        end = draw(st.sampled_from(ENDINGS))
        for line in draw(st.lists(st.sampled_from(SSE_LINES), min_size=1, max_size=4)):
            out += line + end
        out += draw(st.sampled_from(ENDINGS))  # the blank line that ends the event
    return out + draw(st.sampled_from([b"", b"data: partial"]))


def decode(data: bytes, cuts: list[int]) -> tuple[list, int]:
    d = SSEDecoder()
    out = []
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += [(e.data, e.event, e.id, e.retry) for e in d.feed(data[a:b])]
    return out, d.comments


@settings(max_examples=500, deadline=None)
@given(sse_stream().flatmap(lambda d: st.tuples(st.just(d),
                                                st.lists(st.integers(0, 400), max_size=10))))
def test_sse_events_do_not_depend_on_the_split(case):
    data, cuts = case
    whole = decode(data, [])
    assert decode(data, cuts) == whole
    assert decode(data, list(range(1, len(data)))) == whole
