"""GET /v1/ws against a real server: the `websockets` client for the normal
conversation, hand-made frames for the ones a library would never send."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server import Server, wait_for
from streamtools import close_code, frame, read_frames, ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

MODELS = {
    "echo": {"provider": "echo"},
    "parrot": {"provider": "echo", "response": "You said: {prompt}", "token_delay_ms": 5},
    "paced": {"provider": "echo", "token_delay_ms": 20, "repeat": True, "split": "token",
              "max_output_tokens": 1_000_000},
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("ws"), workers=2,
               config={"server": {"max_body_bytes": 4096}, "models": MODELS}).start()
    yield s
    try:
        assert s.stop() == 0, s.log()
    finally:
        s.kill()


def url(srv) -> str:
    return f"ws://{srv.host}:{srv.port}/v1/ws"


def ask(ws, msg: dict) -> list[dict]:
    """Send one prompt; collect the answer up to its final message."""
    ws.send(json.dumps(msg))
    out = []
    while True:
        m = json.loads(ws.recv(timeout=15))
        out.append(m)
        if "done" in m or "error" in m:
            return out


def test_several_prompts_on_one_connection(srv):
    with connect(url(srv), open_timeout=10) as ws:
        for prompt in ("first", "a second, longer prompt", "مرحبا 🚀"):
            msgs = ask(ws, {"prompt": prompt, "model": "parrot"})
            tokens = [m["token"] for m in msgs[:-1]]
            assert len(tokens) > 2 and all(set(m) == {"token"} for m in msgs[:-1])
            done = msgs[-1]
            assert done["done"] is True and done["model"] == "parrot"
            assert done["finish_reason"] == "stop"
            # the same answer and usage as the HTTP API for the same prompt
            full = httpx.post(srv.url + "/v1/chat", json={"prompt": prompt, "model": "parrot"},
                              timeout=10).json()
            assert "".join(tokens) == full["response"] == f"You said: {prompt}"
            assert done["usage"] == full["usage"]
        msgs = ask(ws, {"prompt": "Hello"})  # the default model
        assert "".join(m["token"] for m in msgs[:-1]) == "Hello, AI world!"
        msgs = ask(ws, {"prompt": "Hello", "max_tokens": 2})
        assert "".join(m["token"] for m in msgs[:-1]) == "Hello,"
        assert msgs[-1]["finish_reason"] == "length"


def test_bad_messages_get_errors_and_the_connection_stays(srv):
    with connect(url(srv), open_timeout=10) as ws:
        for bad, param in (("not json", None), ("[1, 2]", None), ('{"prompt": 5}', "prompt"),
                           ('{"prompt": "x", "max_tokens": -1}', "max_tokens")):
            ws.send(bad)
            err = json.loads(ws.recv(timeout=10))["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "invalid_request_error" and err["param"] == param
        ws.send(json.dumps({"prompt": "x", "model": "nope"}))
        err = json.loads(ws.recv(timeout=10))["error"]
        assert err["code"] == "model_not_found"
        msgs = ask(ws, {"prompt": "still here?"})
        assert msgs[-1]["done"] is True


def test_ping_pong_and_close_handshake(srv):
    with connect(url(srv), open_timeout=10) as ws:
        for _ in range(3):
            assert ws.ping(b"are you there").wait(10)
        ws.close(code=1000, reason="bye")
    assert ws.close_code == 1000  # the server echoed our close code
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000


def test_usage_and_stats(srv):
    before = srv.stats()
    with connect(url(srv), open_timeout=10) as ws:
        a = ask(ws, {"prompt": "one two three", "model": "parrot"})[-1]["usage"]
        b = ask(ws, {"prompt": "four", "model": "parrot"})[-1]["usage"]
    wait_for(lambda: srv.stats()["active_connections"] == before["active_connections"], 10,
             what="the socket to close")
    after = srv.stats()
    assert after["tokens_in"] - before["tokens_in"] == a["prompt_tokens"] + b["prompt_tokens"]
    assert after["tokens_out"] - before["tokens_out"] == (a["completion_tokens"]
                                                          + b["completion_tokens"])
    assert after["streams_total"] - before["streams_total"] == 2
    assert after["status"]["1xx"] - before["status"]["1xx"] == 1  # the 101 is a response


# ------------------------------------------------------------ frames no library sends
def handshake(srv, extra: bytes = b""):
    s, head, rest = ws_connect(srv.host, srv.port, extra)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"\r\nSec-WebSocket-Accept: " in head and b"\r\nUpgrade: websocket" in head
    return s, rest


@pytest.mark.parametrize("data,code", [
    (frame(0x1, b'{"prompt":"x"}', mask=False), 1002),       # unmasked client frame
    (frame(0x1, b"hi", rsv=0x4), 1002),                      # reserved bit, no extension
    (frame(0x3, b"x"), 1002),                                # reserved opcode
    (frame(0x9, b"ping", fin=False), 1002),                  # fragmented control frame
    (frame(0x0, b"orphan"), 1002),                           # continuation of nothing
    (frame(0x1, b"\xff\xfe bad utf-8"), 1007),               # invalid UTF-8 text
    (frame(0x2, b"\x00\x01binary"), 1003),                   # binary: not accepted here
    (frame(0x1, b"x" * 5000), 1009),                         # over max_body_bytes (4096)
    (frame(0x1, b"x" * 3000, fin=False) + frame(0x0, b"y" * 3000), 1009),
    (frame(0x8, b"\x03"), 1002),                             # close with a 1-byte payload
    (frame(0x8, b"\x03\xed"), 1002),                         # close with code 1005 on the wire
])
def test_bad_frames_close_with_the_right_code(srv, data, code):
    before = srv.stats()["errors_parse"]
    s, rest = handshake(srv)
    try:
        s.sendall(data)
        frames, eof = read_frames(s, rest)
    finally:
        s.close()
    assert frames and frames[-1][0] == 0x8, frames
    assert close_code(frames[-1][1]) == code
    assert eof, "the server hangs up after a protocol error"
    if code in (1002, 1007):
        assert srv.stats()["errors_parse"] > before


def test_client_close_is_echoed_then_the_server_hangs_up(srv):
    s, rest = handshake(srv)
    try:
        s.sendall(frame(0x8, b"\x0f\xa0custom"))  # 4000: an application code
        frames, eof = read_frames(s, rest)
    finally:
        s.close()
    assert frames[-1][0] == 0x8 and close_code(frames[-1][1]) == 4000 and eof


def test_frames_sent_with_the_handshake_are_kept(srv):
    """A prompt in the same packet as the Upgrade request is answered, and a
    fragmented message with a ping in between is put back together."""
    msg = json.dumps({"prompt": "together"}).encode()
    s, rest = handshake(srv, frame(0x1, msg))
    try:
        s.sendall(frame(0x1, b'{"prompt": "in', fin=False) + frame(0x9, b"p")
                  + frame(0x0, b' parts"}'))
        buf = rest
        while buf.count(b'"done":true') < 2:  # a Close would cancel an answer in progress
            b = s.recv(65536)
            assert b, buf
            buf += b
        s.sendall(frame(0x8, b"\x03\xe8"))
        frames, eof = read_frames(s, buf)
    finally:
        s.close()
    texts = [json.loads(p) for op, p in frames if op == 0x1]
    pongs = [p for op, p in frames if op == 0xA]
    assert pongs == [b"p"]
    dones = [t for t in texts if t.get("done")]
    assert len(dones) == 2
    assert "".join(t.get("token", "") for t in texts) == "Hello, AI world!" * 2
    assert frames[-1][0] == 0x8 and close_code(frames[-1][1]) == 1000


@pytest.mark.parametrize("headers,status", [
    ({"Upgrade": "", "Connection": ""}, 426),                 # a plain GET
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Key": "too-short"}, 400),
    ({"Sec-WebSocket-Key": ""}, 400),
])
def test_bad_handshakes_are_refused(srv, headers, status):
    s, head, _ = ws_connect(srv.host, srv.port, headers=headers)
    s.close()
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), head
    if status == 426 and "Sec-WebSocket-Version" in headers:
        assert "Sec-WebSocket-Version: 13" in lines


def test_disconnect_mid_answer_cancels_it(srv):
    before = srv.stats()
    s, rest = handshake(srv)
    s.sendall(frame(0x1, json.dumps({"prompt": "x", "model": "paced",
                                     "max_tokens": 100_000}).encode()))
    buf = rest
    while buf.count(b'{"token"') < 3:
        buf += s.recv(4096)
    s.close()
    wait_for(lambda: srv.stats()["streams_cancelled"] == before["streams_cancelled"] + 1, 15,
             what="the cancel to be counted")
    assert srv.stats()["streams_active"] == before["streams_active"]


def test_slow_ws_reader_is_bounded(make_server):
    """A WebSocket client that does not read pauses its answer too."""
    srv = make_server(workers=1, config={
        "server": {"write_buffer_bytes": 65536},
        "models": {"big": {"provider": "echo", "repeat": True, "split": "token",
                           "max_output_tokens": 10_000_000}}})
    s, head, rest = ws_connect(srv.host, srv.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    s.sendall(frame(0x1, json.dumps({"prompt": "x", "model": "big",
                                     "max_tokens": 2_000_000}).encode()))
    samples = [srv.stats()["bytes_out"]]

    def plateau() -> bool:
        time.sleep(0.5)
        samples.append(srv.stats()["bytes_out"])
        last = samples[-4:]
        return len(last) == 4 and all(b - a < 10_000 for a, b in zip(last[:-1], last[1:],
                                                                        strict=True))
    try:
        wait_for(plateau, 60, interval=0, what="the answer to pause")
        assert samples[-1] < 16 * 1024 * 1024  # 2M tokens would be ~30 MB
        assert srv.stats()["streams_active"] == 1
    finally:
        s.close()
    wait_for(lambda: srv.stats()["streams_active"] == 0, 15, what="the answer to stop")
    assert srv.stats()["streams_cancelled"] == 1


def test_close_frame_mid_answer_stops_it(srv):
    before = srv.stats()
    s, rest = handshake(srv)
    try:
        s.sendall(frame(0x1, json.dumps({"prompt": "x", "model": "paced",
                                         "max_tokens": 100_000}).encode()))
        buf = rest
        while buf.count(b'{"token"') < 3:
            buf += s.recv(4096)
        s.sendall(frame(0x8, b"\x03\xe8"))
        frames, eof = read_frames(s, buf)
    finally:
        s.close()
    assert frames[-1][0] == 0x8 and close_code(frames[-1][1]) == 1000 and eof
    assert not any(op == 0x1 and b'"done"' in p for op, p in frames)
    wait_for(lambda: srv.stats()["streams_cancelled"] == before["streams_cancelled"] + 1, 15,
             what="the cancel to be counted")


# ------------------------------------------------------------ keepalive and idle clients
def next_frame(s: socket.socket, buf: bytes, timeout: float = 5.0) -> tuple[int, bytes, bytes]:
    """One server frame (opcode, payload) and the bytes after it; bounded wait."""
    deadline = time.monotonic() + timeout
    while True:
        if len(buf) >= 2:
            n, off = buf[1] & 0x7F, 2
            if n == 126 and len(buf) >= 4:
                n, off = int.from_bytes(buf[2:4], "big"), 4
            if n < 127 and len(buf) >= off + n:
                return buf[0] & 0x0F, buf[off:off + n], buf[off + n:]
        s.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = s.recv(65536)
        assert chunk, "the server closed the connection"
        buf += chunk


def serving(srv, pids: list[int]) -> bool:
    """The same workers still up, and answering."""
    return srv.worker_pids() == pids and srv.get_json("/health")["status"] == "ok"


def test_idle_websocket_is_closed_with_1001(make_server):
    srv = make_server(workers=1, config={"server": {"ws_idle_timeout": 1.0, "ws_ping_s": 0}})
    pids = srv.worker_pids()
    with connect(url(srv), open_timeout=10) as ws:
        assert "".join(m.get("token", "") for m in ask(ws, {"prompt": "hi"})) \
            == "Hello, AI world!"
        answered = time.monotonic()
        with pytest.raises(ConnectionClosed) as ei:
            ws.recv(timeout=15)  # bounded: the server must close well before
        waited = time.monotonic() - answered
    assert ei.value.rcvd is not None
    assert (ei.value.rcvd.code, ei.value.rcvd.reason) == (1001, "idle timeout")
    assert waited >= 0.9  # not before the timeout
    wait_for(lambda: srv.stats()["active_connections"] == 1, 10, what="the close")  # /stats itself
    assert serving(srv, pids)


def test_silent_client_is_pinged_then_closed_with_1011(make_server):
    srv = make_server(workers=1, config={"server": {"ws_ping_s": 0.5, "ws_idle_timeout": 0}})
    pids = srv.worker_pids()
    s, rest = handshake(srv)
    try:
        frames, eof = read_frames(s, rest, timeout=15)  # we never answer the ping
    finally:
        s.close()
    assert frames[0] == (0x9, b"neurohttp"), frames
    assert frames[-1][0] == 0x8 and close_code(frames[-1][1]) == 1011 and eof
    assert serving(srv, pids)


def test_client_that_answers_pings_stays_connected(make_server):
    srv = make_server(workers=1, config={"server": {"ws_ping_s": 1.0, "ws_idle_timeout": 0}})
    with connect(url(srv), open_timeout=10) as ws:  # the client answers pings by itself
        time.sleep(4.0)  # at least two pings answered, with no message
        assert "".join(m.get("token", "") for m in ask(ws, {"prompt": "hi"})) \
            == "Hello, AI world!"
    s, rest = handshake(srv)
    try:
        op, payload, rest = next_frame(s, rest)
        assert (op, payload) == (0x9, b"neurohttp")
        s.sendall(frame(0xA, payload))  # the pong: the next silent spell gets a new ping
        op, payload, rest = next_frame(s, rest)
        assert (op, payload) == (0x9, b"neurohttp")
    finally:
        s.close()


def test_ws_reader_that_never_reads_is_dropped_after_send_timeout(make_server):
    srv = make_server(workers=1, config={
        "server": {"write_buffer_bytes": 65536, "send_timeout": 1.0, "ws_ping_s": 0},
        "models": {"big": {"provider": "echo", "repeat": True, "split": "token",
                           "max_output_tokens": 10_000_000}}})
    pids = srv.worker_pids()
    s, head, rest = ws_connect(srv.host, srv.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    try:
        s.sendall(frame(0x1, json.dumps({"prompt": "x", "model": "big",
                                         "max_tokens": 2_000_000}).encode()))
        wait_for(lambda: srv.stats()["streams_total"] == 1, 15, what="the answer to start")
        # the socket stays open and unread: the server must give up on its own
        wait_for(lambda: srv.stats()["streams_active"] == 0, 30, what="the server to drop it")
    finally:
        s.close()
    assert srv.stats()["streams_cancelled"] == 1 and serving(srv, pids)


def test_handshake_check_is_sans_io():
    """protocol/ws_handshake.py: a version and headers in, the accept value
    (RFC 6455's own example) or a refusal out."""
    from neurohttp.protocol.ws_handshake import Refusal, check

    good = {"upgrade": "websocket", "connection": "keep-alive, Upgrade",
            "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert check("1.1", good.get) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    for version, change, status in [("1.1", {"upgrade": None}, 426),
                                    ("1.0", {}, 400),
                                    ("1.1", {"sec-websocket-version": "8"}, 426),
                                    ("1.1", {"sec-websocket-key": "c2hvcnQ="}, 400),
                                    ("1.1", {"sec-websocket-key": "not base64!"}, 400)]:
        r = check(version, (good | change).get)
        assert isinstance(r, Refusal) and r.status == status, (version, change)
    assert check("1.1", (good | {"sec-websocket-version": "8"}).get).headers == {
        "Sec-WebSocket-Version": "13"}
