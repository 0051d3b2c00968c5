"""The seed's curl table, run with real curl and httpx against a 2-worker server."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from neurohttp import __version__


def curl(server, *args: str, timeout: float = 10) -> tuple[int, str, str]:
    """Run curl; return (status, headers text, body)."""
    out = subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), "-D", "-", "-o", "-",
         *args[:-1], server.url + args[-1]],
        capture_output=True, timeout=timeout + 5, check=True)
    raw = out.stdout.decode()
    head, _, body = raw.partition("\r\n\r\n")
    status = int(head.split()[1])
    return status, head.lower(), body


def test_index_page(server):
    status, head, body = curl(server, "/")
    assert status == 200
    assert "content-type: text/html" in head
    assert "NeuroHTTP" in body and __version__ in body
    assert "/health" in body and "/stats" in body and "/v1/chat" in body


def test_health(server):
    status, head, body = curl(server, "/health")
    assert status == 200
    assert f"server: neurohttp/{__version__}" in head
    h = json.loads(body)
    assert h["status"] == "ok" and h["version"] == __version__
    assert h["workers"] == 2 and isinstance(h["uptime"], int)


def test_stats_shape(server):
    status, head, body = curl(server, "/stats")
    assert status == 200 and "application/json" in head
    s = json.loads(body)
    for key in ("requests", "responses", "uptime", "active_connections", "timestamp",
                "status", "latency_ms", "bytes_in", "bytes_out", "tokens_out",
                "streams_active", "workers", "master"):
        assert key in s, key
    assert set(s["latency_ms"]) >= {"p50", "p90", "p99", "max"}
    assert {"2xx", "4xx", "5xx"} <= set(s["status"])
    assert len(s["workers"]) == 2
    assert isinstance(s["uptime"], int) and isinstance(s["timestamp"], int)


@pytest.mark.parametrize("ctype", [None, "application/json", "text/plain"])
def test_chat_any_content_type(server, ctype):
    # curl -d sends application/x-www-form-urlencoded by default: parsed as JSON all the same
    args = ["-d", '{"prompt":"Hello"}']
    if ctype:
        args += ["-H", f"Content-Type: {ctype}"]
    status, head, body = curl(server, *args, "/v1/chat")
    assert status == 200, body
    r = json.loads(body)
    assert r["response"] == "Hello, AI world!"
    assert r["model"] == "echo"
    assert isinstance(r["timestamp"], int)
    u = r["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens"] >= 1 and u["completion_tokens"] == 5


def test_chat_arabic_prompt(server):
    prompt = "مرحبا بالعالم، كيف حالك اليوم؟"
    r = httpx.post(server.url + "/v1/chat", json={"prompt": prompt}, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["response"] == "Hello, AI world!"
    assert body["usage"]["prompt_tokens"] > 5  # counted by the tokenizer, not by bytes


def test_chat_100kb_prompt(server):
    prompt = "lorem ipsum dolor sit amet " * 4000  # ~108 KB
    r = httpx.post(server.url + "/v1/chat", json={"prompt": prompt}, timeout=20)
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] >= 16000


def test_chat_invalid_json(server):
    status, head, body = curl(server, "-d", "{not json", "/v1/chat")
    assert status == 400
    assert "application/json" in head
    err = json.loads(body)["error"]
    assert "JSON" in err["message"] and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,param", [
    ('["a list"]', None), ('{"no_prompt": 1}', "prompt"), ('{"prompt": 42}', "prompt"),
    ('{"prompt": "x", "stream": "yes"}', "stream"), ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
])
def test_chat_bad_fields(server, body, param):
    status, _, text = curl(server, "-d", body, "/v1/chat")
    assert status == 400
    assert json.loads(text)["error"]["param"] == param


def test_chat_unknown_model(server):
    status, _, text = curl(server, "-d", '{"prompt":"x","model":"nope"}', "/v1/chat")
    assert status == 404
    err = json.loads(text)["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_unknown_route_html_and_json(server):
    status, head, body = curl(server, "/no/such/route")
    assert status == 404 and "text/html" in head and "404" in body
    status, head, body = curl(server, "-H", "Accept: application/json", "/no/such/route")
    assert status == 404 and "application/json" in head
    assert json.loads(body)["error"]["message"]
    status, head, body = curl(server, "/v1/nothing-here")  # /v1/* is always JSON
    assert status == 404 and "application/json" in head


def test_method_not_allowed_has_allow(server):
    status, head, _ = curl(server, "-X", "DELETE", "/health")
    assert status == 405
    assert "allow: get, head" in head
    status, head, _ = curl(server, "/v1/chat")  # GET on a POST route
    assert status == 405 and "allow: post" in head


def test_fifty_concurrent_requests(server):
    def one(i: int) -> int:
        with httpx.Client(timeout=15) as c:
            if i % 2:
                return c.post(server.url + "/v1/chat", json={"prompt": f"hi {i}"}).status_code
            return c.get(server.url + "/health").status_code

    with ThreadPoolExecutor(50) as ex:
        codes = list(ex.map(one, range(50)))
    assert codes == [200] * 50


def test_chat_stream_ndjson_and_sse(server):
    status, head, body = curl(server, "-N", "-d", '{"prompt":"Hello","stream":true}', "/v1/chat")
    assert status == 200
    assert "transfer-encoding: chunked" in head and "application/x-ndjson" in head
    lines = [json.loads(x) for x in body.strip().split("\n")]
    tokens = [x["token"] for x in lines if "token" in x]
    assert "".join(tokens) == "Hello, AI world!"
    assert lines[-1]["done"] is True and lines[-1]["usage"]["completion_tokens"] == 5

    status, head, body = curl(server, "-N", "-H", "Accept: text/event-stream",
                              "-d", '{"prompt":"Hello","stream":true}', "/v1/chat")
    assert status == 200 and "text/event-stream" in head
    events = [e[len("data: "):] for e in body.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert "".join(o["token"] for o in objs if "token" in o) == "Hello, AI world!"
    assert objs[-1]["done"] is True
