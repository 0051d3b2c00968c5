"""Sans-IO unit tests of the connection state machine (protocol/h1conn.py):
bytes and a fake clock in, requests, heads and decisions out. No sockets, no
loop: every time is passed in, so each timeout is checked at its deadline."""

from __future__ import annotations

import pytest

from neurohttp.messages import Request
from neurohttp.protocol import serialize as ser
from neurohttp.protocol.h1 import PHASE_BODY, PHASE_HEAD
from neurohttp.protocol.h1conn import INF, Cancel, Conn, Due, Exchange, H1Connection, Next
from neurohttp.protocol.settings import ConnectionSettings

T0 = 1000.0  # the fake clock's start (monotonic seconds)
SETTINGS = ConnectionSettings(max_header_bytes=1024, max_body_bytes=4096, header_timeout=10.0,
                              body_timeout=30.0, keepalive_timeout=5.0, send_timeout=60.0,
                              request_timeout=600.0, max_pipeline=4, linger=2.0)

GET = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
GET_CLOSE = b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
HEAD = b"HEAD /health HTTP/1.1\r\nHost: a\r\n\r\n"
GET10 = b"GET /health HTTP/1.0\r\n\r\n"
GET10_KA = b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


def conn(**kw: float) -> H1Connection[Request]:
    settings = ConnectionSettings(**{**{f: getattr(SETTINGS, f) for f in SETTINGS.__slots__},
                                     **kw})
    return H1Connection(settings, "10.0.0.1", Request, T0)


def answer(c: H1Connection[Request], req: Request | None, status: int = 200,
           body: bytes = b"ok", now: float = T0 + 1, headers: dict[str, str] | None = None,
           ctype: str = "text/plain") -> bytes:
    return c.respond(req, status, ctype, headers, b"", len(body), now)


def fields(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)}


# ---------------------------------------------------------------- keep-alive
def test_http11_stays_open_without_a_connection_field():
    c = conn()
    [r] = c.receive(GET, T0)
    head = answer(c, r)
    assert "connection" not in fields(head) and fields(head)["content-length"] == "2"
    assert c.state is Conn.OPEN and c.body_ok and c.exchange is Exchange.IDLE


def test_connection_close_is_the_last_answer_then_a_lingering_close():
    c = conn()
    [r] = c.receive(GET_CLOSE, T0)
    assert fields(answer(c, r))["connection"] == "close"
    assert c.state is Conn.MUST_CLOSE
    assert c.start_close(T0 + 1) is True  # the client may still send: linger
    assert c.state is Conn.LINGERING and c.linger_until == T0 + 3
    assert c.receive(GET, T0 + 1.5) == []  # input after the last answer is dropped
    assert c.should_read()  # (read and dropped, so the client gets our answer, not a reset)


@pytest.mark.parametrize("raw, keep, field", [(GET10, False, "close"),
                                              (GET10_KA, True, "keep-alive")])
def test_http10_closes_unless_it_asks_for_keep_alive(raw, keep, field):
    c = conn()
    [r] = c.receive(raw, T0)
    assert fields(answer(c, r))["connection"] == field
    assert (c.state is Conn.OPEN) == keep


def test_a_refusal_before_any_request_closes():
    c = conn()
    head = answer(c, None, 503)
    assert fields(head)["connection"] == "close" and c.state is Conn.MUST_CLOSE


def test_close_after_answer_forces_close():
    c = conn()
    [r] = c.receive(GET, T0)
    c.close_after_answer()
    assert fields(answer(c, r, 500))["connection"] == "close"


# ---------------------------------------------------------------- pipelining
def test_pipelined_requests_of_one_read_come_out_in_order():
    c = conn()
    reqs = c.receive(GET + post(b"hi") + HEAD, T0)
    assert [r.method for r in reqs] == ["GET", "POST", "HEAD"]
    assert not c.queue and c.can_take()


def test_requests_behind_an_async_answer_wait_in_order():
    c = conn()
    first, second, third = c.receive(GET + post(b"a") + post(b"bc"), T0)
    c.wait(first, T0)
    assert not c.can_take()
    c.defer([second, third], T0)  # (what the I/O layer does with the rest of the read)
    assert c.queued_bytes == 3 and c.next_request() is None  # first is still in flight
    assert c.receive(HEAD, T0 + 1) == []  # arrives meanwhile: queued behind them
    answer(c, first, now=T0 + 2)
    order = []
    while (item := c.next_request()) is not None:
        order.append((item[0].method, item[0].body, item[1]))
        answer(c, item[0], now=T0 + 3)
    assert order == [("POST", b"a", T0), ("POST", b"bc", T0), ("HEAD", b"", T0 + 1)]
    assert c.queued_bytes == 0


def test_the_queue_is_bounded_in_count_and_bytes():
    c = conn(max_pipeline=2)
    [first] = c.receive(GET, T0)
    c.wait(first, T0)
    c.receive(GET * 2, T0)
    assert c.should_read()
    c.receive(GET, T0)
    assert not c.should_read()  # more than max_pipeline wait
    c2 = conn()
    [first] = c2.receive(GET, T0)
    c2.wait(first, T0)
    c2.receive(post(b"x" * 3000) + post(b"y" * 3000), T0)
    assert len(c2.queue) == 2 and not c2.should_read()  # their bodies are over max_body_bytes


def test_nothing_is_answered_while_the_client_does_not_read():
    c = conn()
    c.pause_writing(T0)
    assert c.receive(GET * 2, T0) == [] and len(c.queue) == 2
    assert c.next_request() is None and not c.should_read()
    c.resume_writing()
    assert c.attention and c.should_read()
    assert c.next_request() is not None


# ---------------------------------------------------------------- HEAD, 1xx, 204, 304
def test_head_gets_the_length_but_no_body():
    c = conn()
    [r] = c.receive(HEAD, T0)
    head = answer(c, r, body=b"x" * 10)
    assert fields(head)["content-length"] == "10" and not c.body_ok
    assert c.state is Conn.OPEN


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_carry_no_length_type_or_body(status):
    c = conn()
    [r] = c.receive(GET, T0)
    head = answer(c, r, status, body=b"ignored", headers={"ETag": '"v1"'})
    f = fields(head)
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert "content-length" not in f and "transfer-encoding" not in f
    assert "content-type" not in f and f["etag"] == '"v1"'
    assert not c.body_ok and c.state is Conn.OPEN  # keep-alive: the framing is unambiguous


@pytest.mark.parametrize("status", [100, 101, 103, 199])
def test_an_interim_status_is_not_an_answer(status):
    c = conn()
    [r] = c.receive(GET, T0)
    with pytest.raises(ValueError, match="not a final answer"):
        answer(c, r, status)


def test_204_over_http10_keep_alive_stays_open():
    c = conn()
    [r] = c.receive(GET10_KA, T0)
    head = answer(c, r, 204)
    assert fields(head)["connection"] == "keep-alive" and c.state is Conn.OPEN


# ---------------------------------------------------------------- streams
def stream(c: H1Connection[Request], req: Request, status: int = 200,
           ping_after: float = 0.0, now: float = T0) -> bytes:
    return c.start_stream(req, status, "text/event-stream", None, b"", ping_after, now)


def test_http11_stream_is_chunked_and_keeps_the_connection():
    c = conn()
    [r] = c.receive(GET, T0)
    f = fields(stream(c, r))
    assert f["transfer-encoding"] == "chunked" and "content-length" not in f
    assert c.exchange is Exchange.STREAMING and c.chunked and c.body_ok
    assert c.frame(b"hi") == b"2\r\nhi\r\n"
    assert c.end_stream(T0 + 1) == ser.LAST_CHUNK
    assert c.exchange is Exchange.IDLE and c.state is Conn.OPEN


def test_http10_stream_is_delimited_by_the_close():
    c = conn()
    [r] = c.receive(GET10_KA, T0)  # keep-alive asked, but the body's end is the close
    f = fields(stream(c, r))
    assert f["connection"] == "close" and "transfer-encoding" not in f
    assert not c.chunked and c.frame(b"hi") == b"hi"
    assert c.end_stream(T0 + 1) == b"" and c.state is Conn.MUST_CLOSE


def test_head_of_a_stream_sends_the_head_only():
    c = conn()
    [r] = c.receive(HEAD, T0)
    assert fields(stream(c, r))["transfer-encoding"] == "chunked"  # as the GET would say
    assert not c.body_ok and c.end_stream(T0 + 1) == b"" and c.state is Conn.OPEN


def test_a_204_stream_has_no_framing():
    c = conn()
    [r] = c.receive(GET, T0)
    f = fields(stream(c, r, 204))
    assert "transfer-encoding" not in f and "content-length" not in f and not c.body_ok
    assert c.end_stream(T0 + 1) == b"" and c.state is Conn.OPEN


def test_a_cut_stream_ends_with_its_abort_event_and_closes():
    c = conn()
    [r] = c.receive(GET, T0)
    stream(c, r)
    c.cancel(Cancel.CUT)
    assert c.take_cancel() is Cancel.CUT and c.take_cancel() is Cancel.NONE
    assert c.cut_stream(b"data: bye\n\n", T0 + 1) == ser.chunk(b"data: bye\n\n") + ser.LAST_CHUNK
    assert c.state is Conn.MUST_CLOSE
    c10 = conn()
    [r] = c10.receive(GET10, T0)
    stream(c10, r)
    assert c10.cut_stream(b"bye", T0 + 1) == b"bye"


def test_an_abandoned_stream_has_no_last_chunk_and_closes():
    c = conn()
    [r] = c.receive(GET, T0)
    stream(c, r)
    c.abandon_stream(T0 + 1)
    assert c.state is Conn.MUST_CLOSE and c.exchange is Exchange.IDLE


# ---------------------------------------------------------------- 100-continue
EXPECT = b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"


def test_100_continue_once_the_head_arrives_and_nothing_is_in_flight():
    c = conn()
    assert c.receive(EXPECT, T0) == [] and c.attention
    assert c.after() is Next.CONTINUE
    assert c.after() is Next.NOTHING  # once
    [r] = c.receive(b"hello", T0)
    assert r.body == b"hello"


def test_100_continue_waits_for_the_answers_before_it():
    c = conn()
    [first] = c.receive(GET, T0)
    c.wait(first, T0)
    assert c.receive(EXPECT, T0) == []
    assert c.after() is Next.NOTHING  # the 100 may not overtake the answer in flight
    answer(c, first)
    assert c.after() is Next.CONTINUE


def test_no_100_continue_when_the_body_came_with_the_head_or_is_empty():
    c = conn()
    [r] = c.receive(EXPECT + b"hello", T0)
    assert c.after() is Next.NOTHING
    c2 = conn()
    [r] = c2.receive(EXPECT.replace(b"Content-Length: 5", b"Content-Length: 0"), T0)
    assert c2.after() is Next.NOTHING


def test_no_100_continue_to_a_client_that_half_closed():
    c = conn()
    c.receive(EXPECT, T0)
    assert c.eof_received() is False  # nothing in flight: close now
    assert c.after() is Next.CLOSE


# ---------------------------------------------------------------- refusals after queued requests
def test_a_refusal_is_answered_after_the_requests_before_it():
    c = conn()
    assert c.receive(GET + HEAD + b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", T0) == []
    order = []
    while (item := c.next_request()) is not None:
        order.append(item[0].method)
        answer(c, item[0])
    assert order == ["GET", "HEAD"] and c.after() is Next.REFUSE
    e = c.take_refusal()
    assert e.status == 400
    assert fields(answer(c, None, 400))["connection"] == "close"
    assert c.state is Conn.MUST_CLOSE


def test_a_refusal_waits_for_the_answer_in_flight():
    c = conn()
    [first] = c.receive(GET, T0)
    c.wait(first, T0)
    c.receive(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\nHost: a\r\n\r\n", T0)
    assert c.after() is Next.NOTHING
    answer(c, first)
    assert c.after() is Next.REFUSE and c.take_refusal().status == 413


# ---------------------------------------------------------------- half-close, lingering close
def test_half_close_answers_what_was_sent_then_closes():
    c = conn()
    [first] = c.receive(GET, T0)
    c.wait(first, T0)
    c.receive(GET, T0)
    assert c.eof_received() is True  # keep the transport to answer
    answer(c, first)
    item = c.next_request()
    assert item is not None
    answer(c, item[0])
    assert c.after() is Next.CLOSE
    assert c.start_close(T0 + 2) is False  # the client has finished sending: close at once


def test_the_linger_ends_at_its_deadline():
    c = conn()
    [r] = c.receive(GET_CLOSE, T0)
    answer(c, r)
    c.start_close(T0 + 1)
    assert c.deadline() == (T0 + 3, Due.CLOSE)
    assert c.check(T0 + 2.9) is Due.NOTHING and c.check(T0 + 3.1) is Due.CLOSE


# ---------------------------------------------------------------- timeouts and deadlines
def test_a_silent_new_connection_gets_408_at_header_timeout():
    c = conn()
    assert c.deadline() == (T0 + 10, Due.TIMEOUT)
    assert c.check(T0 + 9.9) is Due.NOTHING and c.check(T0 + 10.1) is Due.TIMEOUT
    assert c.timed_out() is None
    assert fields(answer(c, None, 408))["connection"] == "close"


def test_the_head_deadline_runs_from_the_connection_not_the_first_byte():
    c = conn()
    c.receive(b"GET /v1/models HT", T0 + 9)  # silent, then a trickle
    assert c.parser.phase == PHASE_HEAD and c.deadline() == (T0 + 10, Due.TIMEOUT)
    req = c.timed_out()
    assert req is not None and req.target == b"/v1/models"  # (the 408's shape: JSON on /v1/)
    assert fields(answer(c, req, 408))["connection"] == "close"


def test_idle_keep_alive_closes_quietly_at_keepalive_timeout():
    c = conn()
    [r] = c.receive(GET, T0)
    answer(c, r, now=T0 + 1)
    assert c.deadline() == (T0 + 6, Due.CLOSE)  # from the end of the answer
    assert c.check(T0 + 5.9) is Due.NOTHING and c.check(T0 + 6.1) is Due.CLOSE


def test_a_head_after_a_keep_alive_answer_runs_from_that_answer():
    c = conn()
    [r] = c.receive(GET, T0)
    answer(c, r, now=T0 + 1)
    c.receive(b"GET / HTTP/1.1\r\n", T0 + 4)
    assert c.deadline() == (T0 + 11, Due.TIMEOUT)


def test_a_body_must_arrive_within_body_timeout_of_its_head():
    c = conn()
    c.receive(post(b"abc")[:-3], T0 + 2)
    assert c.parser.phase == PHASE_BODY and c.deadline() == (T0 + 32, Due.TIMEOUT)


def test_an_unknown_method_line_being_judged_has_the_head_deadline():
    c = conn()
    c.receive(b"BREW /pot HTT", T0 + 1)
    assert c.deadline() == (T0 + 10, Due.TIMEOUT)


def test_output_left_unread_aborts_at_send_timeout_whatever_else():
    c = conn()
    [r] = c.receive(GET, T0)
    c.wait(r, T0)
    c.pause_writing(T0 + 1)
    assert c.deadline() == (T0 + 61, Due.ABORT)


def test_an_async_answer_expires_at_request_timeout():
    c = conn(request_timeout=30.0)
    [r] = c.receive(GET, T0)
    c.wait(r, T0 + 1)
    assert c.deadline() == (T0 + 31, Due.EXPIRE)
    assert c.check(T0 + 30.9) is Due.NOTHING and c.check(T0 + 31.1) is Due.EXPIRE
    c.cancel(Cancel.EXPIRED)
    assert c.check(T0 + 100) is Due.NOTHING  # being cancelled: nothing more is due
    assert c.take_cancel() is Cancel.EXPIRED
    head = answer(c, r, 504, now=T0 + 31.2)  # the 504 goes out like any answer
    assert head.startswith(b"HTTP/1.1 504 ") and c.state is Conn.OPEN


def test_a_silent_stream_is_pinged_and_expires_at_request_timeout():
    c = conn(request_timeout=60.0)
    [r] = c.receive(GET, T0)
    stream(c, r, ping_after=15.0, now=T0)
    assert c.deadline() == (T0 + 15, Due.PING)
    c.pinged(T0 + 15.2)
    assert c.deadline() == (T0 + 30.2, Due.PING)  # pings do not move the expiry
    c.pinged(T0 + 45.3)
    assert c.deadline() == (T0 + 60, Due.EXPIRE)
    c.piece_at = T0 + 50  # a piece went out (the I/O layer stores it)
    assert c.deadline() == (T0 + 65, Due.PING)


def test_a_stream_without_pings_expires_only():
    c = conn(request_timeout=60.0)
    [r] = c.receive(GET, T0)
    stream(c, r, now=T0)
    assert c.deadline() == (T0 + 60, Due.EXPIRE)


def test_nothing_is_due_once_the_last_answer_went_out_or_the_protocol_switched():
    c = conn()
    [r] = c.receive(GET_CLOSE, T0)
    answer(c, r)
    assert c.deadline() == (INF, Due.NOTHING)


# ---------------------------------------------------------------- draining (issue 9)
def test_draining_an_idle_keep_alive_connection_leaves_it_to_its_timeout():
    c = conn()
    [r] = c.receive(GET, T0)
    answer(c, r, now=T0 + 1)
    c.shutdown()
    assert c.state is Conn.DRAINING
    assert c.deadline() == (T0 + 6, Due.CLOSE)  # not closed under a client that may send
    assert c.receive(GET, T0 + 2) == []  # one arrives meanwhile: answered, with close
    item = c.next_request()
    assert item is not None
    assert fields(answer(c, item[0]))["connection"] == "close"
    assert c.state is Conn.MUST_CLOSE


def test_draining_a_new_connection_still_gives_it_header_timeout():
    c = conn()
    c.shutdown()
    assert c.deadline() == (T0 + 10, Due.TIMEOUT)


def test_draining_answers_every_request_already_sent_then_closes():
    c = conn()
    [first] = c.receive(GET, T0)
    c.wait(first, T0)
    c.receive(GET + HEAD, T0)
    c.shutdown()
    conns = [fields(answer(c, first)).get("connection")]
    while (item := c.next_request()) is not None:
        conns.append(fields(answer(c, item[0])).get("connection"))
    assert conns == [None, None, "close"]  # none lost: the last one says close
    assert c.state is Conn.MUST_CLOSE


def test_draining_a_stream_closes_after_it():
    c = conn()
    [r] = c.receive(GET, T0)
    c.shutdown()  # (the request came before the drain; its stream begins after)
    assert fields(stream(c, r))["connection"] == "close"
    c.end_stream(T0 + 1)
    assert c.state is Conn.MUST_CLOSE


# ---------------------------------------------------------------- upgrade
UPGRADE = (b"GET /v1/ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_an_upgrade_pauses_reading_until_taken_and_hands_over_what_followed():
    c = conn()
    [r] = c.receive(UPGRADE + b"\x81\x00", T0)
    assert c.attention and not c.should_read()
    assert c.take_upgrade(r) == b"\x81\x00"
    assert c.state is Conn.SWITCHED and c.deadline() == (INF, Due.NOTHING)


def test_an_upgrade_not_taken_is_answered_as_plain_http_and_closes():
    c = conn()
    [r] = c.receive(UPGRADE, T0)
    assert fields(answer(c, r, 426))["connection"] == "close"  # (an upgrade is never kept)


def test_only_the_pending_upgrade_request_can_switch():
    c = conn()
    [r] = c.receive(GET, T0)
    assert c.take_upgrade(r) is None


# ---------------------------------------------------------------- trusted header lines
def test_trusted_header_lines_go_out_unchecked_and_uncached():
    c = conn()
    [r] = c.receive(GET, T0)
    head = c.respond(r, 200, "text/plain", None, b"x-ratelimit-remaining-requests: 59\r\n", 2,
                     T0 + 1)
    assert head.endswith(b"x-ratelimit-remaining-requests: 59\r\n\r\n")
    [r] = c.receive(GET, T0 + 1)
    assert b"x-ratelimit" not in answer(c, r)  # the cached plain head is another one
