"""HTTP/1.1 over raw sockets against a real 2-worker server: one test per behaviour,
one per bad input, and back-pressure. Waits are bounded and generous; nothing
here asserts a timing."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from email.utils import parsedate_to_datetime

import psutil
import pytest
from server import Server, wait_for

from neurohttp import SERVER_NAME

MAX_HEAD = 4096
MAX_BODY = 65536
CONFIG = {
    "server": {"max_header_bytes": MAX_HEAD, "max_body_bytes": MAX_BODY,
               "header_timeout": 1.5, "body_timeout": 3.0, "keepalive_timeout": 2.0,
               "write_buffer_bytes": 65536},
    # a model that streams slowly, so a response is in flight while we act
    "models": {"echo": {"provider": "echo", "token_delay_ms": 0},
               "slow": {"provider": "echo", "token_delay_ms": 150},
               "slower": {"provider": "echo", "token_delay_ms": 1000}},
}
WAIT = 15.0  # bound on every wait for the server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("http11"), workers=2, config=CONFIG).start()
    s.initial_pids = s.worker_pids()
    yield s
    try:
        assert s.worker_pids() == s.initial_pids, "a worker died or was replaced"
        assert s.stop() == 0, s.log()
        assert "Traceback" not in s.log(), s.log()
    finally:
        s.kill()


# ---------------------------------------------------------------- helpers
class Conn:
    """A raw client socket that reads one response at a time."""

    def __init__(self, srv: Server, timeout: float = WAIT) -> None:
        self.s = socket.create_connection((srv.host, srv.port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def _fill(self) -> None:
        b = self.s.recv(65536)
        if not b:
            raise EOFError(f"server closed the connection; have {self.buf[:200]!r}")
        self.buf += b

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Read exactly one response (a HEAD answer has no body: head_only=True)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        line, *fields = head.decode("latin-1").split("\r\n")
        assert line.startswith("HTTP/1.1 "), line
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        for f in fields:
            k, _, v = f.partition(":")
            headers[k.strip().lower()] = v.strip()
        if head_only or status < 200 or status in (204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self._fill()
                body += self.buf[:size]
                assert self.buf[size:size + 2] == b"\r\n"
                self.buf = self.buf[size + 2:]
                if size == 0:
                    return status, headers, body
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def expect_eof(self, timeout: float = WAIT) -> None:
        """The server closes with nothing more to say (a reset counts as closed too)."""
        self.s.settimeout(timeout)
        try:
            extra = self.buf + read_until_eof(self.s)
        except ConnectionResetError:
            extra = self.buf
        assert extra == b"", f"unexpected bytes before close: {extra[:200]!r}"

    def close(self) -> None:
        self.s.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_until_eof(s: socket.socket) -> bytes:
    """Everything until EOF; a timeout fails the test (the server should have closed)."""
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except TimeoutError:
            raise AssertionError(f"server did not close; read {out[:200]!r}") from None
        if not b:
            return out
        out += b


def assert_common(headers: dict[str, str]) -> None:
    """Server and Date on every response; Date is an RFC 9110 IMF-fixdate."""
    assert headers.get("server") == SERVER_NAME, headers
    assert headers["date"].endswith(" GMT")
    assert abs(parsedate_to_datetime(headers["date"]).timestamp() - time.time()) < 3600


def chat(prompt: str = "Hello", stream: bool = False, model: str | None = None,
         version: str = "1.1", extra: str = "") -> bytes:
    obj: dict = {"prompt": prompt, "stream": stream}
    if model:
        obj["model"] = model
    body = json.dumps(obj).encode()
    return (f"POST /v1/chat HTTP/{version}\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


def stats(srv: Server) -> dict:
    return srv.get_json("/stats")


class StatsPoller:
    """Reads /stats again and again over one keep-alive connection. A connection
    per read would leave the last one closing on its worker while the next read
    counts: on a loaded machine every read could then see one connection more
    than the baseline, and a wait for the baseline never end. Over one
    connection, only the first read can see a connection still closing."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.conn: http.client.HTTPConnection | None = None

    def __call__(self) -> dict:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.srv.host, self.srv.port, timeout=5)
            try:
                self.conn.request("GET", "/stats")
                r = self.conn.getresponse()
                body = r.read()
                assert r.status == 200, (r.status, body)
                return json.loads(body)
            except (OSError, http.client.HTTPException):
                # the server closed it at keepalive_timeout: a new one (an unanswered
                # request on a connection closed under it was never counted)
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def quiet(srv: Server) -> int:
    """The active connections once earlier tests' connections have closed (a lingering
    close takes up to 2 s): only the /stats poller's own. Taken as a baseline, a
    connection still closing from before cannot end during the test and skew it."""
    settle(srv, "active_connections", 1)
    return 1


def settle(srv: Server, key: str, value: int) -> None:
    """Wait until /stats[key] reaches `value` (the poller's connection counts itself
    in active_connections, so the baseline is measured the same way)."""
    poll = StatsPoller(srv)
    try:
        wait_for(lambda: poll()[key] == value, WAIT, 0.1, f"/stats {key} == {value}")
    finally:
        poll.close()


# ---------------------------------------------------------------- keep-alive, pipelining
def test_keep_alive_many_requests_on_one_connection(srv):
    before = stats(srv)["connections_total"]
    with Conn(srv) as c:
        for i in range(5):
            c.send(GET_HEALTH if i % 2 else chat(f"hi {i}"))
            status, headers, body = c.response()
            assert status == 200 and "connection" not in headers
            assert_common(headers)
            assert json.loads(body)
    # 1 connection for the five requests, 1 for the /stats read above
    assert stats(srv)["connections_total"] - before == 2


def test_pipelining_answers_in_request_order(srv):
    # a slow stream first: the requests behind it are queued until it ends
    reqs = [chat("one", stream=True, model="slow"), GET_HEALTH, chat("two"),
            b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", chat("three", stream=True),
            b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n", GET_HEALTH]
    with Conn(srv) as c:
        c.send(b"".join(reqs))
        r = [c.response(head_only=(i == 5)) for i in range(len(reqs))]
    assert [x[0] for x in r] == [200, 200, 200, 404, 200, 200, 200]
    lines = [json.loads(x) for x in r[0][2].splitlines()]
    assert "".join(x.get("token", "") for x in lines) == "Hello, AI world!"
    assert r[0][1]["transfer-encoding"] == "chunked" and lines[-1]["done"] is True
    assert json.loads(r[1][2])["status"] == "ok"
    assert json.loads(r[2][2])["response"] == "Hello, AI world!"
    assert r[4][1]["content-type"] == "application/x-ndjson"
    assert r[5][2] == b"" and int(r[5][1]["content-length"]) == len(r[6][2])
    for _, headers, _ in r:
        assert_common(headers)


def test_half_close_still_answers_pipelined_requests(srv):
    with Conn(srv) as c:
        c.send(chat("x", stream=True, model="slow") + GET_HEALTH)
        c.s.shutdown(socket.SHUT_WR)  # like `printf ... | nc -N`
        assert c.response()[0] == 200
        assert c.response()[0] == 200
        c.expect_eof()


def test_complete_requests_before_garbage_are_answered(srv):
    with Conn(srv) as c:
        c.send(GET_HEALTH + chat("x", stream=True, model="slow") + b"BROKEN LINE\r\n\r\n")
        assert c.response()[0] == 200
        assert c.response()[0] == 200
        status, headers, _ = c.response()
        assert status == 400 and headers["connection"] == "close"
        c.expect_eof()


def test_data_after_connection_close_is_ignored(srv):
    with Conn(srv) as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" + GET_HEALTH)
        status, headers, _ = c.response()
        assert status == 200 and headers["connection"] == "close"
        c.expect_eof()


# ---------------------------------------------------------------- bodies
def prompt_tokens(status_headers_body) -> int:
    status, _, body = status_headers_body
    assert status == 200, body
    return json.loads(body)["usage"]["prompt_tokens"]


def test_content_length_body_in_pieces(srv):
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    wire = chat(prompt)
    with Conn(srv) as c:
        c.send(wire)
        expected = prompt_tokens(c.response())
        head, _, body = wire.partition(b"\r\n\r\n")
        c.send(head + b"\r\n\r\n" + body[:100])
        time.sleep(0.2)
        c.send(body[100:])
        assert prompt_tokens(c.response()) == expected


def test_chunked_body_with_extensions_and_trailers(srv):
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    with Conn(srv) as c:
        c.send(chat(prompt))
        expected = prompt_tokens(c.response())
        body = json.dumps({"prompt": prompt}).encode()
        parts = [body[:7], body[7:300], body[300:]]
        wire = (b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x;name=value\r\n%s\r\n" % (len(parts[0]), parts[0])
                + b"%x\r\n%s\r\n" % (len(parts[1]), parts[1])
                + b"%x;a;b=\"q\"\r\n%s\r\n" % (len(parts[2]), parts[2])
                + b"0;end=1\r\nX-Checksum: 42\r\nX-More: yes\r\n\r\n")
        c.send(wire[:90])
        time.sleep(0.2)
        c.send(wire[90:])
        assert prompt_tokens(c.response()) == expected
        c.send(GET_HEALTH)  # the connection is still in step after the trailers
        assert c.response()[0] == 200


def test_chunk_extension_after_whitespace_is_accepted(srv):
    # RFC 9112 7.1.1 allows BWS before ';' (llhttp refuses it unless told to)
    with Conn(srv) as c:
        body = json.dumps({"prompt": "Hello"}).encode()
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x ;a=b\r\n%s\r\n" % (len(body[:5]), body[:5])
               + b"%x\t;c\r\n%s\r\n0\r\n\r\n" % (len(body[5:]), body[5:]))
        assert c.response()[0] == 200
        c.send(GET_HEALTH)
        assert c.response()[0] == 200
    with Conn(srv) as c:  # the size itself stays hex digits only
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2 2\r\n{}\r\n0\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 400 and headers["connection"] == "close"


def test_invalid_json_and_utf8_bodies_are_400_json(srv):
    with Conn(srv) as c:
        for body in (b"{not json", b'{"prompt": "\xff\xfe"}', b"\x00" * 10, b"[1,2]", b""):
            c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body))
            status, headers, text = c.response()
            assert status == 400 and headers["content-type"] == "application/json"
            assert json.loads(text)["error"]["type"] == "invalid_request_error"
            assert "connection" not in headers  # a bad body is not a bad connection


# ---------------------------------------------------------------- Expect
def test_expect_100_continue_comes_before_the_body(srv):
    body = json.dumps({"prompt": "Hello"}).encode()
    with Conn(srv) as c:
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body))
        status, headers, _ = c.response()  # the interim answer, with no body sent yet
        assert status == 100 and headers == {}
        c.send(body)
        status, headers, text = c.response()
        assert status == 200 and json.loads(text)["response"] == "Hello, AI world!"
        assert_common(headers)


def test_expect_with_too_large_body_gets_413_without_reading_it(srv):
    with Conn(srv) as c:
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
               b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        status, headers, _ = c.response()  # no 100 first: the body is never asked for
        assert status == 413 and headers["connection"] == "close"
        assert_common(headers)
        c.expect_eof()


def test_expect_other_than_continue_is_417(srv):
    with Conn(srv) as c:
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\nContent-Length: 2"
               b"\r\n\r\n{}")
        status, headers, _ = c.response()
        assert status == 417 and headers["connection"] == "close"
        c.expect_eof()


# ---------------------------------------------------------------- HEAD, HTTP/1.0
def test_head_has_length_but_no_body(srv):
    with Conn(srv) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        _, _, page = c.response()
        c.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = c.response(head_only=True)
        assert status == 200 and int(headers["content-length"]) == len(page) > 0
        assert headers["content-type"].startswith("text/html")
        assert_common(headers)
        c.send(GET_HEALTH)  # the next bytes are the next response: no body was sent
        assert c.response()[0] == 200


def test_http10_closes_by_default(srv):
    with Conn(srv) as c:
        c.send(b"GET /health HTTP/1.0\r\n\r\n")
        status, headers, body = c.response()
        assert status == 200 and headers["connection"] == "close" and json.loads(body)
        c.expect_eof()


def test_http10_keep_alive_is_honoured(srv):
    with Conn(srv) as c:
        for _ in range(3):
            c.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = c.response()
            assert status == 200 and headers["connection"] == "keep-alive"
        c.send(b"GET /health HTTP/1.0\r\n\r\n")
        assert c.response()[1]["connection"] == "close"
        c.expect_eof()


def test_http10_stream_is_close_delimited(srv):
    with Conn(srv) as c:
        c.send(chat("x", stream=True, version="1.0"))
        while b"\r\n\r\n" not in c.buf:
            c._fill()
        head, _, rest = c.buf.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head and b"Connection: close" in head
        body = rest + read_until_eof(c.s)
        lines = [json.loads(x) for x in body.splitlines()]
        assert lines[-1]["done"] is True


# ---------------------------------------------------------------- Date/Server everywhere
@pytest.mark.parametrize("data,status", [
    (GET_HEALTH, 200),
    (b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 404),
    (b"DELETE /health HTTP/1.1\r\nHost: t\r\n\r\n", 405),
    (b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n{", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    (chat("x", stream=True), 200),
])
def test_date_and_server_on_every_response(srv, data, status):
    with Conn(srv) as c:
        c.send(data)
        got, headers, _ = c.response()
        assert got == status
        assert_common(headers)


# ---------------------------------------------------------------- limits
def test_431_one_huge_header(srv):
    with Conn(srv) as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nCookie: " + b"c" * (MAX_HEAD + 100)
               + b"\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 431 and headers["connection"] == "close"
        c.expect_eof()


def test_431_many_headers(srv):
    fields = b"".join(b"X-Field-%03d: value\r\n" % i for i in range(300))
    with Conn(srv) as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
        status, headers, _ = c.response()
        assert status == 431 and headers["connection"] == "close"
        c.expect_eof()


def test_431_huge_request_line(srv):
    # choice (ARCHITECTURE.md): the request line shares the head budget, so 431, not 414
    with Conn(srv) as c:
        c.send(b"GET /" + b"a" * (MAX_HEAD + 100) + b" HTTP/1.0\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 431 and headers["connection"] == "close"
        c.expect_eof()


def test_431_head_that_never_ends_is_cut_off(srv):
    with Conn(srv) as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        try:
            for _ in range(2 * MAX_HEAD // 512 + 2):
                c.send(b"v" * 512)
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert c.response()[0] == 431


def test_default_head_limit_is_16k(server):
    # the module-shared default server: 16 KiB heads, 431 above
    with socket.create_connection((server.host, server.port), timeout=WAIT) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 15000 + b"\r\n\r\n")
        assert s.recv(12) == b"HTTP/1.1 200"
    assert server.raw(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 17000
                      + b"\r\n\r\n").startswith(b"HTTP/1.1 431")


def test_413_is_sent_before_the_body_is_read(srv):
    with Conn(srv) as c:
        # no Expect, no body sent at all: the answer comes from the head alone
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
        status, headers, body = c.response()
        assert status == 413 and headers["connection"] == "close"
        # refusals take the route's error shape: OpenAI JSON under /v1/, HTML elsewhere
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert_common(headers)
    with Conn(srv) as c:
        c.send(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
        status, headers, body = c.response()
        assert status == 413 and headers["content-type"].startswith("text/html")


def test_413_reaches_a_client_that_keeps_sending(srv):
    """Lingering close: the server reads and drops the refused body for a while, so a
    client still uploading reads the 413 instead of losing it to a TCP reset."""
    s = socket.create_connection((srv.host, srv.port), timeout=WAIT)
    done = threading.Event()

    def upload() -> None:
        try:
            s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 3000000\r\n\r\n")
            for _ in range(3000000 // 65536 + 1):
                s.sendall(b"x" * 65536)
        except OSError:
            pass
        finally:
            done.set()

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            b = s.recv(65536)  # a reset here would lose the answer: the test fails
            assert b, "closed without an answer"
            data += b
        assert data.startswith(b"HTTP/1.1 413 ")
        assert done.wait(WAIT)
    finally:
        s.close()
        t.join(WAIT)


def test_413_chunked_body_over_limit(srv):
    chunk = b"%x\r\n%s\r\n" % (16384, b"y" * 16384)
    with Conn(srv) as c:
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(MAX_BODY // 16384 + 1):
                c.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, _ = c.response()
        assert status == 413 and headers["connection"] == "close"


# ---------------------------------------------------------------- timeouts
def test_408_when_the_head_does_not_arrive(srv):
    with Conn(srv) as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n")  # never finished
        status, headers, _ = c.response()
        assert status == 408 and headers["connection"] == "close"
        assert_common(headers)
        c.expect_eof()


def test_408_on_a_silent_new_connection(srv):
    with Conn(srv) as c:
        status, headers, _ = c.response()
        assert status == 408 and headers["connection"] == "close"
        c.expect_eof()


def test_408_for_a_client_trickling_one_byte_a_second(srv):
    head = b"GET /health HTTP/1.1\r\nHost: t\r\nUser-Agent: slowloris\r\n\r\n"
    with Conn(srv) as c:
        sent = 0
        for byte in head:
            try:
                c.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            if select.select([c.s], [], [], 1.0)[0]:  # the server spoke (or closed)
                break
        assert sent < len(head), "the server waited for the whole trickled head"
        status, headers, _ = c.response()
        assert status == 408 and headers["connection"] == "close"


def test_408_when_the_body_does_not_arrive(srv):
    with Conn(srv) as c:
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"pro")
        status, headers, _ = c.response()
        assert status == 408 and headers["connection"] == "close"


def test_408_for_a_stalled_body_on_v1_is_openai_json(srv):
    with Conn(srv) as c:
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        status, headers, body = c.response()
        assert status == 408 and headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        err = json.loads(body)["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
        c.expect_eof()


def test_header_timeout_runs_from_the_connection_and_the_last_response(make_server):
    """A client silent for most of header_timeout, then trickling its head, gets its
    408 within header_timeout of connecting (it got a second header_timeout from its
    first byte); on keep-alive, within header_timeout of the previous response."""
    timeout = 4.0
    srv1 = make_server(workers=1, config={"server": {"header_timeout": timeout,
                                                     "keepalive_timeout": 10.0}})
    head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200
    trickled: dict[str, float] = {}

    def client(name: str, keep_alive: bool) -> None:
        with Conn(srv1) as c:
            if keep_alive:
                c.send(GET_HEALTH)
                assert c.response()[0] == 200
            time.sleep(0.75 * timeout)           # silent, within both timeouts
            start = time.monotonic()
            for byte in head:                    # then a byte every 0.2 s, never finished
                try:
                    c.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                if select.select([c.s], [], [], 0.2)[0]:
                    break
            trickled[name] = time.monotonic() - start
            status, headers, _ = c.response()
            assert status == 408 and headers["connection"] == "close"

    threads = [threading.Thread(target=client, args=(n, k))
               for n, k in (("fresh", False), ("keep-alive", True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # the 408 came about a quarter of header_timeout into the trickle (plus the sweep's
    # half second), not a whole header_timeout after its first byte
    assert set(trickled) == {"fresh", "keep-alive"}, trickled
    assert all(v < timeout for v in trickled.values()), trickled


BLOCKING_PLUGIN = '''
import time
from neurohttp.plugins import Response

def setup(app, options):
    @app.route("GET", "/block")
    def block_the_loop(request):
        time.sleep(options["seconds"])   # a handler that blocks the event loop
        return Response("unblocked")
'''


def test_a_loop_stall_does_not_time_out_requests_that_arrived_during_it(make_server, tmp_path):
    """A handler blocks the loop for longer than keepalive_timeout and header_timeout;
    meanwhile idle keep-alive clients send their next request, silent new connections
    their first, and half-sent heads their end. When the loop runs again, the timeout
    sweep must not take them for idle: each gets its answer."""
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "blocker.py").write_text(BLOCKING_PLUGIN)
    srv1 = make_server(workers=1, config={
        "server": {"keepalive_timeout": 1.0, "header_timeout": 2.0},
        "plugins": {"paths": [str(pdir)], "enabled": ["blocker"], "blocker": {"seconds": 3.5}}})
    keep = [Conn(srv1) for _ in range(6)]
    for c in keep:
        c.send(GET_HEALTH)
        assert c.response()[0] == 200
    fresh = [Conn(srv1) for _ in range(3)]
    partial = [Conn(srv1) for _ in range(3)]
    for c in partial:
        c.send(GET_HEALTH[:20])
    blocker = Conn(srv1)
    try:
        blocker.send(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.5)  # the loop is blocked now; everything below waits in the sockets
        for c in keep + fresh:
            c.send(GET_HEALTH)
        for c in partial:
            c.send(GET_HEALTH[20:])
        assert blocker.response()[0] == 200
        statuses = []
        for c in keep + fresh + partial:
            try:
                statuses.append(c.response()[0])
            except (EOFError, ConnectionResetError) as e:
                statuses.append(repr(e))
        assert statuses == [200] * 12, statuses
    finally:
        for c in keep + fresh + partial + [blocker]:
            c.close()


def test_408_for_an_upgrade_request_whose_body_stalls(srv):
    # Upgrade requests collect their body outside llhttp; the body timeout covers that too
    with Conn(srv) as c:
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
               b"Content-Length: 100\r\n\r\n{\"pro")
        status, _, _ = c.response()
        assert status == 408


def test_idle_keep_alive_connection_is_closed_quietly(srv):
    with Conn(srv) as c:
        c.send(GET_HEALTH)
        assert c.response()[0] == 200
        c.expect_eof()  # after keepalive_timeout: no 408, just the close


# ---------------------------------------------------------------- strict parsing
BAD_INPUT = {
    "content_length_and_transfer_encoding":
        b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_content_lengths":
        b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "transfer_encoding_not_final_chunked":
        b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    "transfer_encoding_unknown":
        b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "invalid_chunk_size":
        b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0x2\r\n{}\r\n0\r\n\r\n",
    "invalid_chunk_line":
        b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}XX\r\n0\r\n\r\n",
    "obs_fold": b"GET /health HTTP/1.1\r\nHost: t\r\nX-Folded: one\r\n two\r\n\r\n",
    "bare_cr": b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n",
    "bad_request_line": b"GET/health HTTP/1.1\r\nHost: t\r\n\r\n",
    "bad_version": b"GET /health HTTP/1.x\r\nHost: t\r\n\r\n",
    "nul_in_header": b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
    "control_byte_in_header": b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: a\x1bb\r\n\r\n",
    "space_before_colon": b"GET /health HTTP/1.1\r\nHost : t\r\n\r\n",
    "missing_host": b"GET /health HTTP/1.1\r\n\r\n",
    "control_byte_in_target": b"GET /hea\x01lth HTTP/1.1\r\nHost: t\r\n\r\n",
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_strict_parsing_400_and_close(srv, name):
    with Conn(srv) as c:
        c.send(BAD_INPUT[name])
        status, headers, body = c.response()
        assert status == 400, (name, body)
        assert headers["connection"] == "close"
        if headers["content-type"] == "application/json":  # the /v1/ targets
            assert json.loads(body)["error"]["message"]
        else:
            assert b"400 Bad Request" in body
        assert_common(headers)
        c.expect_eof()


@pytest.mark.parametrize("line", [b"FOO /health HTTP/1.1", b"BREW /pot HTTP/1.1",
                                  b"get /health HTTP/1.1", b"DESCRIBE / HTTP/1.1"])
def test_unknown_method_is_501(srv, line):
    # RFC 9110 9.1: a well-formed method the server does not know (case-sensitive); the
    # request before it on the connection is answered first
    with Conn(srv) as c:
        c.send(GET_HEALTH + line + b"\r\nHost: t\r\n\r\n")
        assert c.response()[0] == 200
        status, headers, _ = c.response()
        assert status == 501 and headers["connection"] == "close"
        assert_common(headers)
        c.expect_eof()


@pytest.mark.parametrize("data", [b"GET /health HTTP/2.0\r\nHost: t\r\n\r\n",
                                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
def test_http2_over_http1_is_505(srv, data):
    with Conn(srv) as c:
        c.send(data)
        status, headers, _ = c.response()
        assert status == 505 and headers["connection"] == "close"
        c.expect_eof()


@pytest.mark.parametrize("te", [b"Transfer-Encoding: gzip, chunked\r\n",
                                b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"])
def test_non_chunked_transfer_coding_is_501(srv, te):
    # valid HTTP ("chunked" is final), but the server decodes no other coding; one line
    # or two, the same list (RFC 9110 5.3) and the same answer
    with Conn(srv) as c:
        c.send(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\n" + te + b"\r\n0\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 501 and headers["connection"] == "close"
        c.expect_eof()


@pytest.mark.parametrize("target,status", [
    (b"http://other.example/health", 200),     # absolute-form: the path is routed
    (b"/health?x=1&y", 200),
    (b"/%68ealth", 200),                        # percent-decoded before routing
    (b"/health/../health", 404),                # never resolved: routes match exactly
    (b"//health", 404),
])
def test_odd_request_targets(srv, target, status):
    with Conn(srv) as c:
        c.send(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.response()[0] == status
        c.send(GET_HEALTH)  # the connection stays usable
        assert c.response()[0] == 200


def test_asterisk_target_is_only_for_options(srv):
    # RFC 9112 3.2.4: asterisk-form is for a server-wide OPTIONS only
    with Conn(srv) as c:
        c.send(b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.response()[0] != 400
        c.send(GET_HEALTH)
        assert c.response()[0] == 200
    with Conn(srv) as c:
        c.send(b"GET * HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 400 and headers["connection"] == "close"
        c.expect_eof()


def test_connect_and_upgrade_are_answered_then_closed(srv):
    for data in (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"):
        with Conn(srv) as c:
            c.send(data + GET_HEALTH)
            status, headers, _ = c.response()
            assert status in (200, 404, 405) and headers["connection"] == "close"
            c.expect_eof()


# ---------------------------------------------------------------- back-pressure
def worker_rss(srv: Server) -> int:
    return sum(psutil.Process(p).memory_info().rss for p in srv.worker_pids())


def test_pipelining_client_that_never_reads_is_paused(srv):
    """The server stops reading a client that sends without reading: what it buffers
    stays bounded and it parses nothing more, while the client's sends block."""
    base_conns = quiet(srv)
    rss_before = worker_rss(srv)
    s = socket.create_connection((srv.host, srv.port), timeout=WAIT)
    try:
        s.setblocking(False)
        batch = GET_HEALTH * 2000            # 66 KB of requests, 500 KB of answers
        limit = 200 * 1024 * 1024            # what an unbounded server would swallow
        sent, stalled = 0, None
        deadline = time.monotonic() + 60
        while sent < limit and time.monotonic() < deadline:
            try:
                sent += s.send(batch)
                stalled = None
            except BlockingIOError:
                now = time.monotonic()
                stalled = stalled or now
                if now - stalled > 2.0:
                    break
                time.sleep(0.01)
        assert sent < limit, "the server kept reading a client that never reads"
        # Nothing more is parsed while the client is stuck: only our /stats reads count.
        def parked() -> bool:
            a = stats(srv)["requests"]
            time.sleep(0.5)
            return stats(srv)["requests"] - a == 1
        wait_for(parked, WAIT, 0.1, "the server to stop parsing")
        growth = worker_rss(srv) - rss_before
        assert growth < 48 * 1024 * 1024, f"workers grew by {growth >> 20} MiB"
    finally:
        s.close()
    settle(srv, "active_connections", base_conns)


def test_disconnect_mid_request_leaves_nothing(make_server):
    # its own server, with timeouts longer than any wait here: every connection is
    # still mid-request when it goes, never answered 408 first on a loaded machine
    srv1 = make_server(workers=2, config={"server": {"header_timeout": 60.0,
                                                     "body_timeout": 60.0}})
    base = quiet(srv1)
    accepted = StatsPoller(srv1)
    total = accepted()["connections_total"]  # (monotonic: a count cannot be missed)
    socks = []
    for data in (b"GET /hea", b"GET /health HTTP/1.1\r\nHost: t\r\n",
                 b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{\"pr",
                 b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                 b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 5\r\n\r\n"):
        s = socket.create_connection((srv1.host, srv1.port), timeout=WAIT)
        s.sendall(data)
        socks.append(s)
    try:
        wait_for(lambda: accepted()["connections_total"] >= total + len(socks), WAIT, 0.1,
                 "the connections to be accepted")
    finally:
        accepted.close()
    # the Expect request is parsed (its 100 Continue came) and the others are open
    assert socks[-1].recv(100).startswith(b"HTTP/1.1 100 Continue")
    for i, s in enumerate(socks):
        if i % 2:  # half of them with a reset instead of a FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    settle(srv1, "active_connections", base)


def test_disconnect_mid_response_stream_leaves_nothing(srv):
    base = quiet(srv)
    before = stats(srv)
    with Conn(srv) as c:
        c.send(chat("x", stream=True, model="slower"))  # 5 s: still running when we leave
        while b"\r\n\r\n" not in c.buf:
            c._fill()
        assert c.buf.startswith(b"HTTP/1.1 200")
        assert stats(srv)["streams_active"] == 1
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    settle(srv, "streams_active", 0)
    # (not before["active_connections"]: the last /stats connection may still be closing)
    settle(srv, "active_connections", base)
    assert stats(srv)["streams_cancelled"] == before["streams_cancelled"] + 1


def test_cancelled_answers_are_counted_and_logged_as_499(make_server, tmp_path):
    """A client that leaves mid-stream, or before an async answer, still gets its
    response counted (as 499, nginx's "client closed request", in 4xx) and an
    access-log line: requests == responses once it is gone. Pipelined requests it
    left unanswered are never counted."""
    log_path = tmp_path / "access.log"
    srv1 = make_server(workers=1, config={
        "log": {"access_log": str(log_path)},
        "models": {"slower": {"provider": "echo", "token_delay_ms": 1000}}})
    before = stats(srv1)
    with Conn(srv1) as c:  # a stream: leave after its head and first token, with a reset
        c.send(chat("x", stream=True, model="slower") + GET_HEALTH * 3)
        while b"\r\n\r\n" not in c.buf:
            c._fill()
        assert c.buf.startswith(b"HTTP/1.1 200")
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    settle(srv1, "streams_active", 0)
    with Conn(srv1) as c:  # a whole (not streamed) answer that takes seconds: leave first
        c.send(chat("x", model="slower"))
        wait_for(lambda: stats(srv1)["requests"] >= before["requests"] + 4, WAIT, 0.1,
                 "the request to be taken")
        # a reset: a FIN alone is a half-close, whose answer is still sent
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wait_for(lambda: stats(srv1)["status"]["4xx"] == before["status"]["4xx"] + 2, WAIT, 0.1,
             "both answers to be counted")
    after = stats(srv1)
    # every counted request has its counted response (a /stats read counts itself as a
    # request, not yet as a response: the difference stays 1); the pipelined GETs never ran
    assert before["requests"] - before["responses"] == 1, before
    assert after["requests"] - after["responses"] == 1, after
    assert after["status"]["2xx"] - before["status"]["2xx"] == \
        after["requests"] - before["requests"] - 2, (before, after)
    assert after["streams_cancelled"] == before["streams_cancelled"] + 1

    def logged() -> list[dict]:
        lines = [json.loads(x) for x in log_path.read_text().splitlines()] \
            if log_path.exists() else []
        return [x for x in lines if x["status"] == 499]
    cancelled = wait_for(lambda: len(logged()) == 2 and logged(), WAIT, 0.1, "two 499 lines")
    assert [x["path"] for x in cancelled] == ["/v1/chat", "/v1/chat"]
    assert cancelled[0]["bytes"] > 0  # the stream's head and first token went out


def test_disconnect_with_unread_pipelined_responses_leaves_nothing(srv):
    base = quiet(srv)
    for _ in range(3):
        s = socket.create_connection((srv.host, srv.port), timeout=WAIT)
        s.sendall((chat("x", stream=True, model="slow") + GET_HEALTH * 50) * 3)
        s.close()
    settle(srv, "streams_active", 0)
    settle(srv, "active_connections", base)


def test_client_that_never_reads_is_dropped_after_send_timeout(make_server):
    srv1 = make_server(workers=1, config={"server": {"send_timeout": 2.0,
                                                     "write_buffer_bytes": 16384}})
    base = stats(srv1)["active_connections"]
    s = socket.create_connection((srv1.host, srv1.port), timeout=WAIT)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 20000)  # ~20 MB of pages, never read
        wait_for(lambda: stats(srv1)["active_connections"] == base + 1, WAIT, 0.1, "accept")
        # the server gives up on us although we never close: nothing is left behind
        settle(srv1, "active_connections", base)
    finally:
        s.close()


# ---------------------------------------------------------------- connection cap
def test_connection_cap_per_worker_gets_503(make_server):
    cap = 4
    srv1 = make_server(workers=1, config={"server": {"max_connections": cap}})
    held = []
    try:
        for _ in range(cap - 1):  # the cap minus one: leaves room for our /stats probe
            c = Conn(srv1)
            c.send(GET_HEALTH)
            assert c.response()[0] == 200
            held.append(c)
        last = Conn(srv1)
        last.send(GET_HEALTH)
        assert last.response()[0] == 200
        held.append(last)
        with Conn(srv1) as over:
            status, headers, _ = over.response()  # refused without a request
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert_common(headers)
            over.expect_eof()
        held.pop().close()

        def admitted() -> bool:
            with Conn(srv1) as c:
                c.send(GET_HEALTH)
                return c.response()[0] == 200
        wait_for(admitted, WAIT, 0.2, "a slot to free up")
    finally:
        for c in held:
            c.close()


# ---------------------------------------------------------------- last: still healthy
def test_server_is_still_healthy_after_everything(srv):
    assert srv.worker_pids() == srv.initial_pids
    status, _, body = srv.request("GET", "/health")
    assert status == 200 and json.loads(body)["workers"] == 2
    s = stats(srv)
    assert s["streams_active"] == 0
