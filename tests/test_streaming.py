"""Streaming behaviour against real servers: curl -N, SSE hygiene and idle pings,
back-pressure from a slow reader, cancellation on disconnect, and streams
during TERM and HUP."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import openai
import psutil
import pytest
from server import Server, wait_for
from streamtools import RawStream, data_events
from websockets.sync.client import connect as ws_connect

HELLO = [{"role": "user", "content": "Hello"}]
CHAT = "/v1/chat/completions"

MODELS = {
    "echo": {"provider": "echo"},
    "paced": {"provider": "echo", "token_delay_ms": 10, "repeat": True, "split": "token"},
    "slow": {"provider": "echo", "token_delay_ms": 250, "repeat": True, "split": "token"},
    "sleepy": {"provider": "echo", "token_delay_ms": 1500},
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("stream"), workers=2,
               config={"server": {"sse_ping_s": 0.4}, "models": MODELS}).start()
    yield s
    try:
        assert s.stop() == 0, s.log()
    finally:
        s.kill()


def completion(model: str, **kw) -> dict:
    return {"model": model, "messages": HELLO, "stream": True, **kw}


# ------------------------------------------------------------ curl -N
def test_curl_sse_stream(srv):
    out = subprocess.run(
        ["curl", "-sS", "-N", "--max-time", "20", "-D", "-", "-H", "Content-Type: application/json",
         "-d", json.dumps(completion("paced", max_tokens=20,
                                     stream_options={"include_usage": True})),
         srv.url + CHAT], capture_output=True, timeout=30, check=True)
    head, _, body = out.stdout.decode().partition("\r\n\r\n")
    head = head.lower()
    assert head.startswith("http/1.1 200")
    assert "content-type: text/event-stream" in head
    assert "cache-control: no-cache" in head and "x-accel-buffering: no" in head
    assert "transfer-encoding: chunked" in head and "content-length" not in head
    assert "content-encoding" not in head
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    objs = data_events(events)
    assert objs[-1] == "[DONE]"
    usage = objs[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    chunks = objs[:-2]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith("Hello, AI world! Hello, AI world!")
    assert len(chunks) == 20 + 2  # role, 20 tokens, finish


def test_curl_gets_tokens_while_they_are_generated(srv):
    """Nothing buffers a stream: curl -N prints the first token while the server
    is still generating the rest; killing curl then cancels the generation."""
    before = srv.stats()
    proc = subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "60", "-d",
         json.dumps(completion("slow", max_tokens=200)), srv.url + CHAT],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        got = []

        def first_token() -> None:
            for line in proc.stdout:
                if b'"content":"Hello"' in line:
                    got.append(line)
                    return

        reader = threading.Thread(target=first_token, daemon=True)
        reader.start()
        reader.join(30)
        assert got, "no token within 30 s"
        s = srv.stats()
        assert s["streams_active"] == before["streams_active"] + 1  # still generating
        assert s["streams_total"] == before["streams_total"] + 1
    finally:
        proc.terminate()
        proc.wait(10)
    wait_for(lambda: srv.stats()["streams_cancelled"] == before["streams_cancelled"] + 1,
             15, what="the cut stream counted as cancelled")
    assert srv.stats()["streams_active"] == before["streams_active"]


# ------------------------------------------------------------ SSE hygiene
def test_idle_stream_gets_ping_comments(srv):
    st = RawStream(srv.host, srv.port, CHAT, completion("sleepy"))
    try:
        status, headers = st.read_head()
        assert status == 200 and headers["content-type"] == "text/event-stream"
        events = list(st.events())
    finally:
        st.close()
    assert ": ping" in events  # 2 x 1.5 s of silence with sse_ping_s = 0.4
    objs = data_events(events)
    assert objs[-1] == "[DONE]"
    text = "".join(o["choices"][0]["delta"].get("content") or "" for o in objs[:-1])
    assert text == "Hello, AI world!"
    # the SDK reads through the comments
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
    chunks = list(c.chat.completions.create(model="sleepy", messages=HELLO, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hello, AI world!"
    c.close()


def test_seed_sse_pings_and_ndjson_does_not(srv):
    st = RawStream(srv.host, srv.port, "/v1/chat",
                   {"prompt": "hi", "model": "sleepy", "stream": True},
                   headers={"Accept": "text/event-stream"})
    try:
        events = list(st.events())
    finally:
        st.close()
    assert ": ping" in events
    assert st.headers["x-accel-buffering"] == "no"
    objs = data_events(events)
    assert objs[-1] == "[DONE]" and objs[-2]["done"] is True
    st = RawStream(srv.host, srv.port, "/v1/chat", {"prompt": "hi", "model": "sleepy",
                                                     "stream": True})
    try:
        lines = list(st.lines())
    finally:
        st.close()
    assert st.headers["content-type"] == "application/x-ndjson"
    objs = [json.loads(x) for x in lines]  # every line is JSON: no comments in NDJSON
    assert "".join(o.get("token", "") for o in objs) == "Hello, AI world!"


# ------------------------------------------------------------ back-pressure
def worker_rss(server: Server) -> int:
    (pid,) = server.worker_pids()
    return psutil.Process(pid).memory_info().rss


def test_slow_reader_pauses_the_stream(make_server):
    """A client that stops reading stops the generation once the socket buffers
    and write_buffer_bytes are full: bytes_out stops growing and the worker's
    memory does not grow with the answer (about 60 MB if buffered)."""
    srv = make_server(workers=1, config={
        "server": {"write_buffer_bytes": 65536},
        "models": {"big": {"provider": "echo", "repeat": True, "split": "token",
                           "max_output_tokens": 1_000_000}}})
    httpx.post(srv.url + CHAT, json={"model": "big", "messages": HELLO, "max_tokens": 1000},
               timeout=10)  # warm up the worker before measuring it
    rss0 = worker_rss(srv)
    out0 = srv.stats()["bytes_out"]
    st = RawStream(srv.host, srv.port, CHAT, completion("big", max_tokens=400_000),
                   rcvbuf=8192)
    try:
        st.read_head()
        next(st.events())
        samples = [srv.stats()["bytes_out"]]

        def plateau() -> bool:
            # paused: bytes_out grows only by the /stats answers themselves (~2 KB each)
            time.sleep(0.5)
            samples.append(srv.stats()["bytes_out"])
            last = samples[-4:]
            return len(last) == 4 and all(b - a < 10_000 for a, b in zip(last[:-1], last[1:], strict=True))

        wait_for(plateau, 60, interval=0, what="the stream to pause")
        sent = samples[-1] - out0
        assert sent < 16 * 1024 * 1024, sent  # kernel buffers + 64 KiB, not 60 MB
        assert worker_rss(srv) - rss0 < 24 * 1024 * 1024
        assert srv.stats()["streams_active"] == 1
        # reading resumes the stream
        got = 0
        while got < 4 * 1024 * 1024:
            got += len(st.sock.recv(1 << 20))
        wait_for(lambda: srv.stats()["bytes_out"] > samples[-1] + 1_000_000, 15,
                 what="the stream to resume")
    finally:
        st.close()
    wait_for(lambda: srv.stats()["streams_active"] == 0, 15, what="the stream to stop")
    s = srv.stats()
    assert s["streams_cancelled"] == 1
    assert s["bytes_out"] - out0 < 40 * 1024 * 1024  # nowhere near the whole answer


# ------------------------------------------------------------ cancellation
def test_disconnect_stops_the_generation(make_server):
    srv = make_server(workers=1, config={
        "log": {"level": "debug"},
        "models": {"paced": {"provider": "echo", "token_delay_ms": 20, "repeat": True,
                             "split": "token", "max_output_tokens": 1_000_000}}})
    before = srv.stats()
    st = RawStream(srv.host, srv.port, CHAT, completion("paced", max_tokens=100_000))
    events = st.events()
    for _ in range(4):  # role chunk + 3 tokens
        next(events)
    st.close()
    wait_for(lambda: srv.stats()["streams_cancelled"] == before["streams_cancelled"] + 1, 15,
             what="streams_cancelled to move")
    s = srv.stats()
    assert s["streams_active"] == 0
    assert s["tokens_out"] - before["tokens_out"] < 1000  # counted what was produced
    assert srv.get_json("/health")["status"] == "ok"  # the worker's loop is free
    # the provider's generator was closed right there, not run to its end
    m = wait_for(lambda: re.search(r"echo: stream stopped after (\d+) tokens", srv.log()), 10,
                 what="the provider to be closed")
    assert int(m.group(1)) < 1000


def test_unpaced_stream_leaves_the_loop_free_and_stops(make_server):
    """A zero-delay answer of millions of tokens shares the worker with other
    requests, and stops when its client goes."""
    srv = make_server(workers=1, config={
        "models": {"instant": {"provider": "echo", "repeat": True, "split": "token",
                               "max_output_tokens": 1_000_000_000}}})
    st = RawStream(srv.host, srv.port, CHAT, completion("instant", max_tokens=50_000_000))
    stop = threading.Event()
    received = [0]

    def read() -> None:
        try:
            while not stop.is_set():
                received[0] += len(st.sock.recv(1 << 16))
        except OSError:
            pass

    st.read_head()
    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        for _ in range(5):  # served by the same (only) worker while it streams
            assert srv.get_json("/health")["status"] == "ok"
            assert srv.stats()["streams_active"] == 1
        assert received[0] > 0
    finally:
        stop.set()
        st.sock.shutdown(socket.SHUT_RDWR)
        st.close()
        t.join(10)
    wait_for(lambda: srv.stats()["streams_cancelled"] == 1, 15, what="the cancel")
    assert srv.stats()["streams_active"] == 0


# ------------------------------------------------------------ TERM and HUP
def test_term_lets_short_streams_finish_and_cuts_long_ones(make_server):
    srv = make_server(workers=2, config={
        "server": {"graceful_timeout": 3.0},
        "models": {"paced": {"provider": "echo", "token_delay_ms": 50, "repeat": True,
                             "split": "token"}}})
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    started = threading.Semaphore(0)
    results: dict[str, object] = {}

    def sdk_stream(name: str, max_tokens: int) -> None:
        try:
            text = ""
            finish = None
            for i, ch in enumerate(client.chat.completions.create(
                    model="paced", messages=HELLO, max_tokens=max_tokens, stream=True)):
                if i == 1:
                    started.release()
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
            results[name] = (text, finish)
        except Exception as e:
            results[name] = e

    def raw_stream(name: str, path: str, body: dict, **kw) -> None:
        st = RawStream(srv.host, srv.port, path, body, timeout=60, **kw)
        try:
            items = []
            it = st.lines() if path == "/v1/chat" else st.events()
            for i, x in enumerate(it):
                items.append(x)
                if i == 1:
                    started.release()
            results[name] = (items, st.finished)
        except Exception as e:
            results[name] = e
        finally:
            st.close()

    def ws_stream(name: str) -> None:
        try:
            with ws_connect(f"ws://{srv.host}:{srv.port}/v1/ws", open_timeout=10) as ws:
                ws.send(json.dumps({"prompt": "hi", "model": "paced", "max_tokens": 2000}))
                msgs = []
                try:
                    while True:
                        msgs.append(json.loads(ws.recv(timeout=60)))
                        if len(msgs) == 2:
                            started.release()
                except Exception:
                    pass
                results[name] = (msgs, ws.close_code)
        except Exception as e:
            results[name] = e

    threads = [
        threading.Thread(target=sdk_stream, args=("short1", 8)),
        threading.Thread(target=sdk_stream, args=("short2", 12)),
        threading.Thread(target=sdk_stream, args=("long1", 2000)),
        threading.Thread(target=sdk_stream, args=("long2", 2000)),
        threading.Thread(target=raw_stream, args=("raw_sse", CHAT, completion("paced", max_tokens=2000))),
        threading.Thread(target=raw_stream, args=("raw_ndjson", "/v1/chat",
                                                  {"prompt": "hi", "model": "paced",
                                                   "max_tokens": 2000, "stream": True})),
        threading.Thread(target=ws_stream, args=("ws",)),
    ]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=30), "streams did not start"
    srv.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    client.close()

    for name in ("short1", "short2"):
        text, finish = results[name]
        assert finish == "length" and text.startswith("Hello, AI world!"), results[name]
    for name in ("long1", "long2"):
        e = results[name]
        assert isinstance(e, openai.APIError), e
        assert "shutting down" in e.message and e.type == "server_error"
    events, finished = results["raw_sse"]
    assert finished, "the body ended with its last chunk"
    last = data_events(events)[-1]
    assert last["error"]["code"] == "server_shutdown" and set(last["error"]) == {
        "message", "type", "param", "code"}
    lines, finished = results["raw_ndjson"]
    assert finished and json.loads(lines[-1])["error"]["code"] == "server_shutdown"
    msgs, code = results["ws"]
    assert msgs[-1]["error"]["code"] == "server_shutdown"
    assert code == 1001


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reload_lets_a_stream_finish(make_server):
    # a fixed port: a reload re-reads the binds, and "port 0" would mean a new one
    srv = make_server(workers=1, bind=f"127.0.0.1:{free_port()}", config={
        "models": {"paced": {"provider": "echo", "token_delay_ms": 40, "repeat": True,
                             "split": "token"}}})
    old = srv.worker_pids()
    st = RawStream(srv.host, srv.port, CHAT, completion("paced", max_tokens=40), timeout=30)
    try:
        events = st.events()
        got = [next(events), next(events)]
        srv.send_signal(signal.SIGHUP)
        got += list(events)
    finally:
        st.close()
    assert st.finished
    objs = data_events(got)
    assert objs[-1] == "[DONE]" and objs[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for o in objs[:-1] if o["choices"][0]["delta"].get("content")) == 40
    wait_for(lambda: srv.worker_pids() and srv.worker_pids() != old, 30, what="new worker")
    r = httpx.post(srv.url + CHAT, json={"model": "paced", "messages": HELLO, "max_tokens": 3},
                   timeout=10)
    assert r.json()["choices"][0]["message"]["content"] == "Hello, AI"
