"""plugins/openai_proxy.py on a real server against a real fake upstream
(tests/proxy_upstream.py, in its own process): the official SDK's
embeddings, streamed answers and uploads both ways without buffering, the
keys on each side, admission with [auth], disconnects and upstream errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from proxy_upstream import ProxyUpstream, vector
from server import ROOT, parse_responses, read_all, wait_for

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
CLIENT_KEY = "sk-client-key-abcdef"
ENV = {"NEUROHTTP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}


@pytest.fixture
def upstream(tmp_path):
    up = ProxyUpstream(tmp_path / "upstream").start()
    yield up
    up.stop()


def proxy_config(up: Any, extra: dict[str, Any] | None = None,
                 server: dict[str, Any] | None = None, **opts: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"max_body_bytes": 1 << 20, **(server or {})},
        "plugins": {"paths": [str(ROOT / "plugins")], "enabled": ["openai_proxy"],
                    "openai_proxy": {"base_url": f"{up.url}/v1",
                                     "api_key_env": "NEUROHTTP_TEST_UPSTREAM_KEY", **opts}}}
    cfg.update(extra or {})
    return cfg


def start(make_server, up: Any, workers: int = 1, **kw: Any) -> Any:
    return make_server(workers=workers, config=proxy_config(up, **kw), env=ENV)


def status_of(path: str) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


# ---------------------------------------------------------------- the SDK
def test_the_sdk_embeddings_work_through_the_proxy_with_the_upstream_key(make_server, upstream):
    srv = start(make_server, upstream)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=CLIENT_KEY, max_retries=0,
                           timeout=20)
    got = client.embeddings.create(model="fake:embeddings", input=["hello", "world"])
    assert [d.index for d in got.data] == [0, 1]
    for i, d in enumerate(got.data):  # (the SDK asks for base64 and decodes it)
        want = struct.unpack("<8f", struct.pack("<8f", *vector(i, 8)))
        assert d.embedding == pytest.approx(list(want))
    assert got.usage.prompt_tokens == 2
    seen = upstream.state()["log"][-1]
    assert seen["path"] == "/v1/embeddings" and seen["method"] == "POST"
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in json.dumps(seen)  # the client's key never goes upstream


def test_headers_are_filtered_both_ways_and_the_upstream_key_never_comes_back(
        make_server, upstream):
    srv = start(make_server, upstream)
    r = httpx.post(f"{srv.url}/v1/moderations?x=1&y=%20z", content=b'{"input": "hi"}',
                   headers={"x-fake": "echo_request", "Authorization": f"Bearer {CLIENT_KEY}",
                            "x-api-key": CLIENT_KEY, "Cookie": "session=1",
                            "X-Forwarded-For": "1.2.3.4", "Connection": "keep-alive, x-hop",
                            "x-hop": "1", "OpenAI-Beta": "assistants=v2",
                            "Content-Type": "application/json"}, timeout=20)
    assert r.status_code == 200
    doc = r.json()
    assert doc["path"] == "/v1/moderations?x=1&y=%20z" and doc["body_bytes"] == 15
    h = doc["headers"]
    assert h["authorization"] == f"Bearer {UPSTREAM_KEY}"
    for gone in ("x-api-key", "cookie", "x-forwarded-for", "x-hop"):
        assert gone not in h, gone
    assert h["openai-beta"] == "assistants=v2" and h["content-type"] == "application/json"
    assert h["host"] == f"127.0.0.1:{upstream.port}"
    assert UPSTREAM_KEY not in str(r.headers)  # (the echo's body shows what it was sent)


def test_core_routes_are_never_proxied_and_dot_segments_are_refused(make_server, upstream):
    srv = start(make_server, upstream, paths=["/v1"])
    r = httpx.get(f"{srv.url}/v1/models", timeout=20)
    assert r.status_code == 200 and r.json()["object"] == "list"  # the core's own answer
    for path in ("/v1/files/../chat/completions", "/v1/files/%2e%2e/x", "/v1/./embeddings"):
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
        [(status, _, body)] = parse_responses(read_all(s))
        s.close()
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_path", path
    assert upstream.state()["requests"] == 0


# ---------------------------------------------------------------- streaming both ways
def test_a_streamed_answer_passes_event_by_event(make_server, upstream):
    srv = start(make_server, upstream)
    arrivals: list[float] = []
    events: list[str] = []
    with httpx.stream("POST", f"{srv.url}/v1/completions",
                      json={"model": "x", "prompt": "hi", "stream": True},
                      headers={"x-fake": "stream;count=4;delay_ms=400"}, timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                events.append(line)
    assert events[-1] == "data: [DONE]" and len(events) == 7  # role, 4 tokens, finish, DONE
    # the upstream spaced its events 0.4 s apart: they came as they were sent, not at
    # the end (buffered, they would all arrive within a few ms)
    assert arrivals[-1] - arrivals[0] > 1.0, arrivals
    assert arrivals[2] - arrivals[0] > 0.3


def test_a_100_mb_upload_streams_through_without_the_worker_growing(make_server, upstream):
    srv = start(make_server, upstream)
    [pid] = srv.worker_pids()
    status = f"/proc/{pid}/status"
    httpx.get(f"{srv.url}/health", timeout=10)
    before = status_of(status)
    total = 100 << 20
    block = os.urandom(1 << 20)
    want = hashlib.sha256(block * 100).hexdigest()
    s = socket.create_connection((srv.host, srv.port), timeout=60)
    s.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nx-fake: sink\r\nConnection: close\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\n"
              b"Content-Length: %d\r\n\r\n" % total)
    for _ in range(100):
        s.sendall(block)
    [(code, _, body)] = parse_responses(read_all(s, timeout=60))
    s.close()
    assert code == 200 and json.loads(body) == {"received": total, "sha256": want}
    after = status_of(status)
    grew = after["VmHWM"] - before["VmHWM"]
    assert grew < 8 << 20, f"the worker's peak RSS grew {grew >> 10} KiB ({before} -> {after})"
    seen = upstream.state()["log"][-1]
    assert seen["headers"]["content-length"] == str(total)  # passed on as it came
    assert seen["headers"]["content-type"] == "multipart/form-data; boundary=b"


def test_a_chunked_multipart_upload_through_httpx_streams_to_the_upstream(make_server, upstream):
    srv = start(make_server, upstream)
    parts = [os.urandom(300_000) for _ in range(10)]

    def gen():
        yield from parts

    r = httpx.post(f"{srv.url}/v1/audio/transcriptions", content=gen(),
                   headers={"x-fake": "sink", "Content-Type": "multipart/form-data; boundary=q"},
                   timeout=30)
    assert r.status_code == 200
    assert r.json() == {"received": 3_000_000, "sha256": hashlib.sha256(b"".join(parts)).hexdigest()}
    seen = upstream.state()["log"][-1]
    assert seen["path"] == "/v1/audio/transcriptions"
    assert seen["headers"]["transfer-encoding"] == "chunked"


def test_a_client_gone_mid_upload_closes_the_upstream_connection(make_server, upstream):
    srv = start(make_server, upstream)
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    s.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nx-fake: sink\r\n"
              b"Content-Length: %d\r\n\r\n" % (50 << 20))
    s.sendall(b"x" * (2 << 20))
    upstream.wait_for(lambda st: st["connections_open"] == 1 and st["received"] > 0,
                      what="the upload under way")
    s.close()
    st = upstream.wait_for(lambda st: st["connections_open"] == 0,
                           what="the proxy closing its upstream connection")
    assert st["received"] < 50 << 20
    assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200  # worker fine


# ---------------------------------------------------------------- admission
def auth_config() -> dict[str, Any]:
    return {"auth": {"enabled": True, "keys": [
        {"name": "alice", "sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest(), "rpm": 100},
        {"name": "bob", "sha256": hashlib.sha256(b"sk-bob-only-some-models").hexdigest(),
         "models": ["echo"]}]}}


def test_with_auth_a_bad_key_is_401_and_nothing_reaches_the_upstream(make_server, upstream):
    srv = start(make_server, upstream, extra=auth_config())
    # a big upload with a wrong key, waiting for 100 Continue: refused before any byte of it
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    s.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong\r\n"
              b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (100 << 20))
    [(code, headers, body)] = parse_responses(read_all(s))
    s.close()
    assert code == 401 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="fake:embeddings", input="hi")
    assert upstream.state()["requests"] == 0
    # a key limited to some models may not use paths whose body is not read
    r = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "fake:embeddings", "input": "x"},
                   headers={"Authorization": "Bearer sk-bob-only-some-models"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert upstream.state()["requests"] == 0
    # the right key: passed, with the server's key upstream, counted in the key's figures
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="fake:embeddings", input="hi")
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert raw.parse().data[0].index == 0
    assert upstream.state()["log"][-1]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    alice = srv.stats()["auth"]["keys"]["alice"]
    assert alice["requests"] == 1, alice


# ---------------------------------------------------------------- upstream errors
def test_upstream_errors_are_mapped_in_openai_shape(make_server, upstream, tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    srv = make_server(workers=1, env=ENV, config={
        "plugins": {"paths": [str(ROOT / "plugins")], "enabled": ["openai_proxy"],
                    "openai_proxy": {"base_url": f"http://127.0.0.1:{port}/v1",
                                     "api_key_env": "NEUROHTTP_TEST_UPSTREAM_KEY"}}})
    r = httpx.post(f"{srv.url}/v1/embeddings", json={"input": "x"}, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    assert str(port) not in r.text and UPSTREAM_KEY not in r.text
    srv2 = start(make_server, upstream, first_byte_timeout_s=1)
    r = httpx.post(f"{srv2.url}/v1/embeddings", json={"input": "x"},
                   headers={"x-fake": "hang"}, timeout=20)
    assert r.status_code == 504 and r.json()["error"]["type"] == "upstream_timeout"
    upstream.wait_for(lambda st: st["disconnects"] >= 1, what="the hung request closed")
    r = httpx.post(f"{srv2.url}/v1/embeddings", json={"input": "x"},
                   headers={"x-fake": "status;code=401"}, timeout=20)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth"
    r = httpx.get(f"{srv2.url}/v1/files/file-123", headers={"x-fake": "status;code=404"},
                  timeout=20)
    assert r.status_code == 404 and r.json()["error"]["message"] == "fake upstream error 404"


def test_a_bad_option_stops_the_start_naming_plugin_and_key(tmp_path, upstream):
    from server import Server
    srv = Server(tmp_path / "bad", workers=1, env=ENV,
                 config=proxy_config(upstream, paths=["/chat"]))
    srv.start(wait=False)
    try:
        wait_for(lambda: srv.proc.poll() is not None, timeout=20, what="the server giving up")
        # the loader's words: the key in the file, the plugin, the value refused
        assert "plugins.openai_proxy.paths: '/chat' is not a path under /v1/" in srv.log()
    finally:
        srv.stop()
