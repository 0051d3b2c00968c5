"""One exchange's framing and deadline against a real server (raw sockets):
204/304/1xx answers, streams that carry no body, the request_timeout of an
async answer and of a silent stream, and a drain under pipelined requests.
The sans-IO decisions behind them are unit-tested in test_h1conn.py."""

from __future__ import annotations

import json
import signal
import time

import pytest
from server import Server, wait_for
from test_http11 import Conn

WAIT = 15.0

PLUGIN = r'''
import asyncio
from neurohttp.plugins import Response, StreamingResponse

def setup(app, options):
    def fixed(status):
        return lambda request: Response(b"dropped", status=status, headers={"ETag": '"v1"'})
    for status in (204, 304, 103):
        app.add_route("GET", f"/s{status}", fixed(status))

    async def hang(request):
        await asyncio.Event().wait()     # an answer that never comes
    app.add_route("GET", "/hang", hang)
    app.add_route("GET", "/v1/hang", hang)

    async def slow(request):
        await asyncio.sleep(float(request.query.get("s", "1")))
        return Response("slow")
    app.add_route("GET", "/slow", slow)

    def silent_stream(request):
        async def pieces():
            yield b"first"
            await asyncio.Event().wait()  # its source goes silent
        return StreamingResponse(pieces(), content_type="text/plain")
    app.add_route("GET", "/silent-stream", silent_stream)

    limits = b"x-ratelimit-limit-requests: 60\r\n"  # built once by trusted code
    app.add_route("GET", "/trusted", lambda request: Response(
        b"{}", headers={"X-Plain": "1"}, content_type="application/json",
        trusted_headers=limits + b"x-ratelimit-remaining-requests: %d\r\n" % 59))

    @app.after_response
    def tag(request, response):   # a hook works on a copy: the trusted lines stay
        if request.path == "/trusted":
            response.headers["X-Hooked"] = "yes"

    def empty_stream(request):
        async def pieces():
            yield b"never sent"
        return StreamingResponse(pieces(), status=204)
    app.add_route("GET", "/stream204", empty_stream)
'''


def plugin_config(tmp: object, **server: object) -> dict:
    pdir = tmp / "plugins"  # type: ignore[operator]
    pdir.mkdir(exist_ok=True)
    (pdir / "exchange.py").write_text(PLUGIN)
    return {"server": {"request_timeout": 2.0, **server},
            "plugins": {"paths": [str(pdir)], "enabled": ["exchange"]}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exchange")
    s = Server(tmp, workers=1, config=plugin_config(tmp)).start()
    yield s
    try:
        assert s.stop() == 0, s.log()
        assert "Traceback" not in s.log(), s.log()
    finally:
        s.kill()


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


# ---------------------------------------------------------------- bodyless answers
@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_go_out_without_content_length_or_body(srv, status):
    """RFC 9110 forbids Content-Length on a 204; on a 304 it may only repeat the
    200's, which the server does not know, so none is invented. The next answer on
    the connection follows right after the head."""
    with Conn(srv) as c:
        c.send(get(f"/s{status}") + GET_HEALTH)
        st, headers, body = c.response()
        assert st == status and body == b""
        assert "content-length" not in headers and "transfer-encoding" not in headers
        assert headers["etag"] == '"v1"' and "connection" not in headers
        st, _, body = c.response()
        assert st == 200 and json.loads(body)["status"] == "ok"


def test_an_interim_status_from_a_handler_is_a_500(srv):
    """A 1xx cannot end an exchange (the client would wait for the final answer):
    the handler's 103 is refused with a 500, logged."""
    with Conn(srv) as c:
        c.send(get("/s103"))
        st, headers, _ = c.response()
        assert st == 500 and headers["connection"] == "close"
    wait_for(lambda: "not a final answer" in srv.log(), WAIT, 0.1, "the log line")


def test_a_204_stream_sends_no_body_and_keeps_the_connection(srv):
    with Conn(srv) as c:
        c.send(get("/stream204") + GET_HEALTH)
        st, headers, body = c.response()
        assert st == 204 and body == b"" and "transfer-encoding" not in headers
        assert c.response()[0] == 200
        assert b"never sent" not in c.buf


def test_trusted_header_lines_reach_the_client_beside_the_checked_ones(srv):
    with Conn(srv) as c:
        c.send(get("/trusted") + GET_HEALTH)
        st, headers, body = c.response()
        assert st == 200 and body == b"{}"
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "59"
        assert headers["x-plain"] == "1" and headers["x-hooked"] == "yes"
        assert c.response()[0] == 200


# ---------------------------------------------------------------- request_timeout
def stats(srv: Server) -> dict:
    return srv.get_json("/stats")


def test_an_async_answer_that_never_comes_gets_504_and_the_connection_lives(srv):
    before = stats(srv)
    with Conn(srv) as c:
        c.send(get("/slow?s=0.5"))  # under request_timeout: answered
        assert c.response()[0] == 200
        t = time.monotonic()
        c.send(get("/hang"))
        st, headers, body = c.response()
        assert st == 504 and headers["content-type"].startswith("text/html")
        assert time.monotonic() - t >= 1.5  # (not before request_timeout: 2 s)
        c.send(get("/v1/hang"))  # in the route's shape: OpenAI JSON under /v1/
        st, headers, body = c.response()
        assert st == 504 and json.loads(body)["error"]["message"]
        c.send(GET_HEALTH)  # keep-alive: the connection still serves
        assert c.response()[0] == 200
    after = stats(srv)
    # every request counted has its response counted (the /stats read is one of each,
    # counted as a response only after it was read)
    assert after["requests"] - before["requests"] == 5
    assert after["status"]["5xx"] - before["status"]["5xx"] == 2


def test_a_stream_whose_source_goes_silent_is_closed_unfinished(srv):
    """request_timeout bounds the wait for a stream's next piece too: the client
    sees the connection close without the last chunk, an incomplete body."""
    with Conn(srv) as c:
        c.send(get("/silent-stream"))
        while b"first\r\n" not in c.buf:
            c._fill()
        assert c.buf.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in c.buf
        c.s.settimeout(WAIT)
        rest = b""
        while True:
            b = c.s.recv(65536)
            if not b:
                break
            rest += b
        assert b"0\r\n\r\n" not in c.buf + rest  # no last chunk: the client knows it is cut
    wait_for(lambda: stats(srv)["streams_active"] == 0, WAIT, 0.1, "the stream to end")


# ---------------------------------------------------------------- drain
def test_a_drain_answers_every_pipelined_request_then_closes(make_server, tmp_path):
    """A worker told to stop while a request is in flight with more pipelined
    behind it answers them all (the last with Connection: close) instead of
    closing after the first and losing the rest."""
    srv1 = make_server(workers=1, config=plugin_config(tmp_path, graceful_timeout=10.0))
    before = stats(srv1)["requests"]
    with Conn(srv1) as c:
        c.send(get("/slow?s=1.5") + GET_HEALTH + GET_HEALTH)
        wait_for(lambda: stats(srv1)["requests"] >= before + 2, WAIT, 0.05,
                 "the slow request to be taken")
        srv1.send_signal(signal.SIGTERM)  # the master stops; the worker drains
        answers = [c.response() for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert [a[1].get("connection") for a in answers] == [None, None, "close"]
        c.expect_eof()
