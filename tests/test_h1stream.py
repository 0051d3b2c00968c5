"""Sans-IO unit tests of streamed request bodies (protocol/h1stream.py): bytes
and a fake clock in; requests handed out at their head, body pieces, flow
control, limits and timeouts out. No sockets, no loop."""

from __future__ import annotations

import pytest

from neurohttp.messages import StreamedRequest
from neurohttp.protocol import serialize as ser
from neurohttp.protocol.h1conn import Conn, Due, Next
from neurohttp.protocol.h1stream import BodyError, BodyReader, StreamingConnection
from neurohttp.protocol.settings import ConnectionSettings

T0 = 1000.0
SETTINGS = ConnectionSettings(max_header_bytes=1024, max_body_bytes=4096, header_timeout=10.0,
                              body_timeout=30.0, keepalive_timeout=5.0, send_timeout=60.0,
                              request_timeout=600.0, max_pipeline=4, linger=2.0)
UPLOAD = 100_000  # the streamed route's limit in these tests
HIGH = 8192       # the reader's bound before reading pauses


def limit(req: StreamedRequest) -> int:
    return UPLOAD if req.path.startswith("/up") else 0


def conn() -> StreamingConnection[StreamedRequest]:
    return StreamingConnection(SETTINGS, "10.0.0.1", StreamedRequest, T0, limit, UPLOAD, HIGH)


def head(path: str = "/up", length: int | None = None, extra: bytes = b"") -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else \
        b"Content-Length: %d\r\n" % length
    return b"POST %s HTTP/1.1\r\nHost: a\r\n%s%s\r\n" % (path.encode(), framing, extra)


def drain(reader: BodyReader) -> bytes:
    out = b""
    while True:
        d = reader.take()
        if not d:
            return out
        out += d


def test_a_streamed_route_gets_its_request_at_the_head_and_the_body_as_it_comes():
    c = conn()
    [r] = c.receive(head(length=10), T0)
    assert r.reader is not None and r.body == b"" and r.streamed
    assert r.reader.take() is None  # nothing yet: wait
    woken = []
    r.reader.wake = lambda: woken.append(1)
    assert c.receive(b"hello", T0 + 1) == []
    assert woken == [1] and r.reader.take() == b"hello" and r.reader.take() is None
    assert not r.keep_alive  # an answer now could not keep the connection
    c.receive(b"world", T0 + 2)
    assert r.reader.take() == b"world" and r.reader.take() == b""  # ended
    assert r.keep_alive  # the body ended: keep-alive as the client asked


def test_a_collected_route_and_a_bodyless_request_are_untouched():
    c = conn()
    [r] = c.receive(head("/v1/chat", 5) + b"abcde", T0)
    assert r.reader is None and r.body == b"abcde" and not r.streamed
    c.respond(r, 200, "text/plain", None, b"", 0, T0)
    [g] = c.receive(b"GET /up HTTP/1.1\r\nHost: a\r\n\r\n", T0)
    assert g.reader is None and g.keep_alive


def test_chunked_upload_pieces_and_the_next_pipelined_request():
    c = conn()
    [r] = c.receive(head() + b"5\r\nhello\r\n", T0)
    assert r.reader is not None
    c.wait(r, T0)
    assert c.receive(b"6\r\n world\r\n0\r\n\r\n" + head("/v1/chat", 2) + b"ok", T0) == []
    assert drain(r.reader) == b"hello world" and r.reader.ended
    c.respond(r, 200, "text/plain", None, b"", 0, T0 + 1)
    nxt = c.next_request()
    assert nxt is not None and nxt[0].body == b"ok"  # queued behind the upload, in order


def test_collected_bodies_keep_max_body_bytes_and_streamed_ones_their_own_limit():
    c = conn()
    c.receive(head("/v1/chat", 5000), T0)  # over max_body_bytes (4096) on a collected route
    assert c.refusal is not None and c.refusal.status == 413
    c = conn()
    [r] = c.receive(head("/up", 50_000), T0)  # far over max_body_bytes: its route streams
    assert r.reader is not None
    c = conn()
    c.receive(head("/up", UPLOAD + 1), T0)  # declared over the route's limit: refused at once
    assert c.refusal is not None and c.refusal.status == 413


def test_a_chunked_upload_over_its_limit_fails_its_reader_with_413_and_no_second_answer():
    c = conn()
    [r] = c.receive(head(), T0)
    c.wait(r, T0)
    piece = b"x" * 40_000
    framed = b"%x\r\n%s\r\n" % (len(piece), piece)
    c.receive(framed, T0)
    c.receive(framed, T0)
    drain(r.reader)
    c.receive(framed, T0)  # 120,000 > 100,000
    with pytest.raises(BodyError) as e:
        r.reader.take()
    assert e.value.status == 413
    assert c.refusal is None  # the handler answers it (its error), and that answer is the last
    assert c.state is Conn.CLOSING
    assert c.respond(r, 413, "text/plain", None, b"", 0, T0).find(b"close") > 0


def test_bad_chunk_framing_mid_upload_reaches_the_handler_as_400():
    # (a failed body drops what it held: an incomplete body is of no use)
    c = conn()
    [r] = c.receive(head() + b"5\r\nhello\r\n", T0)
    c.wait(r, T0)
    c.receive(b"zz\r\n", T0)
    with pytest.raises(BodyError) as e:
        r.reader.take()
    assert e.value.status == 400 and c.refusal is None


def test_reading_pauses_while_the_handler_is_behind_and_resumes_when_it_takes():
    c = conn()
    [r] = c.receive(head(length=50_000), T0)
    c.wait(r, T0)
    assert c.should_read()
    c.receive(b"a" * 5000, T0)
    assert c.should_read()
    c.receive(b"b" * 5000, T0)  # 10,000 buffered >= 8192
    assert c.attention and not c.should_read()
    r.reader.take()
    assert c.should_read()


def test_a_silent_client_mid_upload_is_due_stall_then_408_to_the_handler():
    c = conn()
    [r] = c.receive(head(length=100), T0)
    c.wait(r, T0)
    c.receive(b"x" * 10, T0 + 5)
    assert c.deadline() == (T0 + 5 + 30.0, Due.STALL)
    assert c.check(T0 + 30) is Due.NOTHING
    assert c.check(T0 + 35.1) is Due.STALL
    c.stall()
    with pytest.raises(BodyError) as e:
        r.reader.take()
    assert e.value.status == 408 and c.state is Conn.CLOSING
    assert c.receive(b"late bytes", T0 + 36) == []  # dropped


def test_while_paused_the_stall_clock_stops_and_request_timeout_runs_from_progress():
    c = conn()
    [r] = c.receive(head(length=50_000), T0)
    c.wait(r, T0)
    c.receive(b"a" * 9000, T0 + 100)  # full: we stopped reading; the handler is behind
    assert c.deadline() == (T0 + 100 + 600.0, Due.EXPIRE)
    r.reader.take()
    r.reader.progress_at = T0 + 700  # (the I/O side stamps each take)
    assert c.deadline() == (T0 + 730, Due.STALL)


def test_the_100_continue_goes_when_the_handler_first_asks_for_the_body():
    c = conn()
    [r] = c.receive(head(length=10, extra=b"Expect: 100-continue\r\n"), T0)
    c.wait(r, T0)
    assert c.after() is Next.NOTHING  # not before the handler wants the body
    assert c.continue_due(r.reader) is True
    assert c.continue_due(r.reader) is False  # once


def test_an_early_answer_closes_and_sends_no_100_continue():
    c = conn()
    [r] = c.receive(head(length=10, extra=b"Expect: 100-continue\r\n"), T0)
    h = c.respond(r, 401, "application/json", None, b"", 2, T0)
    assert b"connection: close" in h.lower() and c.state is Conn.MUST_CLOSE
    assert c.continue_due(r.reader) is False
    assert c.after() is not Next.CONTINUE


def test_eof_mid_upload_is_the_client_gone_and_a_lost_connection_too():
    c = conn()
    [r] = c.receive(head(length=100) + b"abc", T0)
    c.wait(r, T0)
    assert c.eof_received() is False  # close now: the handler goes with the connection
    c.lost()
    with pytest.raises(BodyError) as e:
        r.reader.take()
    assert e.value.status == 499
    c2 = conn()
    [r2] = c2.receive(head(length=100), T0)
    c2.lost()
    with pytest.raises(BodyError) as e:
        r2.reader.take()
    assert e.value.status == 499


def test_an_answer_after_the_whole_body_keeps_the_connection():
    c = conn()
    [r] = c.receive(head(length=3) + b"abc", T0)
    assert r.reader is not None and r.reader.ended and r.keep_alive
    h = c.respond(r, 200, "text/plain", None, b"", 0, T0)
    assert b"close" not in h.lower() and c.state is Conn.OPEN
    assert c.after() is Next.NOTHING and ser.CONTINUE  # nothing more is due
