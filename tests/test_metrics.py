"""/metrics parsed by prometheus_client's own parser, checked against /stats after
a known set of requests; the windowed figures moving after a burst; the
[stats] allow list; the dashboard's files served by the server itself."""

from __future__ import annotations

import json
import os
import re
import signal
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families
from server import parse_responses, read_all, wait_for

from neurohttp.stats import layout as L


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str | None = None, **labels) -> float:
    """The one sample of `family` (sample `name`, default the family's) with `labels`."""
    f = fams[family]
    hits = [s for s in f.samples if s.name == (name or f.samples[0].name)
            and all(s.labels.get(k) == str(v) for k, v in labels.items())]
    assert len(hits) == 1, (family, name, labels, f.samples[:5])
    return hits[0].value


def test_metrics_parse_and_agree_with_stats(make_server):
    srv = make_server(workers=2)
    base = srv.stats()  # the harness's readiness checks already asked for /health
    h0 = base["routes"]["/health"]["status"]["2xx"]
    assert base["routes"]["/stats"]["requests"] == 0 and h0 >= 1
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for _ in range(7):
            assert c.get("/health").status_code == 200
        for _ in range(3):
            assert c.post("/v1/chat", json={"prompt": "Hello there"}).status_code == 200
        with c.stream("POST", "/v1/chat", json={"prompt": "Hi", "stream": True}) as r:
            assert r.status_code == 200
            r.read()
        assert c.get("/no/such/page").status_code == 404
        assert c.get("/other/missing").status_code == 404
        assert c.delete("/health").status_code == 405
    bad = srv.raw(b"NOT HTTP AT ALL\r\n\r\n")  # a protocol error: 400, counted as "other"
    assert b" 400 " in bad.split(b"\r\n")[0]

    stats = srv.stats()
    status, headers, body = srv.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = families(body.decode())

    for name in ("neurohttp_http_requests", "neurohttp_request_duration_seconds",
                 "neurohttp_active_connections", "neurohttp_streams_active",
                 "neurohttp_streams_cancelled", "neurohttp_tokens", "neurohttp_worker_restarts",
                 "neurohttp_reloads", "neurohttp_errors", "neurohttp_process_cpu_seconds",
                 "neurohttp_process_resident_memory_bytes", "neurohttp_process_open_fds",
                 "neurohttp_model_tokens", "neurohttp_window_latency_seconds"):
        assert name in fams, name
    assert fams["neurohttp_request_duration_seconds"].type == "histogram"
    assert fams["neurohttp_http_requests"].type == "counter"

    # requests by route and status class: the known set, in both documents
    req = "neurohttp_http_requests"
    for route, cls, n in (("/health", "2xx", h0 + 7), ("/health", "4xx", 1),
                          ("/v1/chat", "2xx", 4), ("other", "4xx", 3)):
        assert sample(fams, req, route=route, status=cls) == n, (route, cls)
        assert stats["routes"][route]["status"][cls] == n, (route, cls)
    # a /stats document does not count itself; /metrics counted both /stats responses
    assert stats["routes"]["/stats"]["requests"] == 1
    assert sample(fams, req, route="/stats", status="2xx") == 2
    by_route = sum(s.value for s in fams[req].samples)
    assert by_route == stats["responses"] + 1
    assert sample(fams, "neurohttp_responses") == stats["responses"] + 1

    # the latency histogram: the shared-memory buckets, cumulative, ending at the count
    buckets = [s for s in fams["neurohttp_request_duration_seconds"].samples
               if s.name.endswith("_bucket")]
    assert [b.labels["le"] for b in buckets][-1] == "+Inf"
    les = [float(b.labels["le"]) for b in buckets[:-1]]
    assert les == [pytest_approx(x / 1e6) for x in L.BUCKET_BOUNDS_US]
    counts = [b.value for b in buckets]
    assert counts == sorted(counts)
    count = sample(fams, "neurohttp_request_duration_seconds",
                   "neurohttp_request_duration_seconds_count")
    assert counts[-1] == count == stats["responses"] + 1
    assert sample(fams, "neurohttp_request_duration_seconds",
                  "neurohttp_request_duration_seconds_sum") > 0

    # tokens, streams, errors, restarts and reloads agree with /stats
    assert stats["tokens_in"] > 0 and stats["tokens_out"] == 4 * 5
    assert sample(fams, "neurohttp_tokens", direction="in") == stats["tokens_in"]
    assert sample(fams, "neurohttp_tokens", direction="out") == stats["tokens_out"]
    assert sample(fams, "neurohttp_model_tokens", model="echo", direction="out") == 20
    assert sample(fams, "neurohttp_model_requests", model="echo") == 4
    assert stats["models"]["echo"]["requests"] == 4
    assert stats["models"]["echo"]["tokens_in"] == stats["tokens_in"]
    assert sample(fams, "neurohttp_streams") == stats["streams_total"] == 1
    assert sample(fams, "neurohttp_streams_cancelled") == stats["streams_cancelled"] == 0
    assert sample(fams, "neurohttp_streams_active") == 0
    assert sample(fams, "neurohttp_errors", kind="protocol") == stats["errors_parse"] == 1
    assert sample(fams, "neurohttp_errors", kind="client") == stats["status"]["4xx"] == 4
    assert sample(fams, "neurohttp_errors", kind="server") == stats["status"]["5xx"] == 0
    assert sample(fams, "neurohttp_worker_restarts") == stats["master"]["restarts"] == 0
    assert sample(fams, "neurohttp_reloads") == stats["master"]["reloads"] == 0
    assert sample(fams, "neurohttp_workers") == 2
    # the /metrics connection itself is open while it is answered
    assert sample(fams, "neurohttp_active_connections") >= 1
    per_worker = sum(s.value for s in fams["neurohttp_worker_active_connections"].samples)
    assert per_worker == sample(fams, "neurohttp_active_connections")

    # process figures for the master and each worker, by pid
    cpu = {(s.labels["role"], int(s.labels["pid"])): s.value
           for s in fams["neurohttp_process_cpu_seconds"].samples}
    assert set(cpu) == {("master", srv.pid)} | {("worker", p) for p in srv.worker_pids()}
    for fam in ("neurohttp_process_resident_memory_bytes", "neurohttp_process_open_fds"):
        assert len(fams[fam].samples) == 3 and all(s.value > 0 for s in fams[fam].samples)
    assert {w["pid"] for w in stats["workers"]} == set(srv.worker_pids())
    assert all(w["process"]["rss_bytes"] > 0 for w in stats["workers"])


def pytest_approx(x: float):
    import pytest
    return pytest.approx(x, rel=1e-5)


def test_window_moves_after_a_burst(make_server):
    # echo paced at 60 ms between tokens: every chat takes >= 120 ms (3 tokens)
    srv = make_server(workers=2, config={"models": {"echo": {"provider": "echo",
                                                             "token_delay_ms": 60}}})
    before = srv.stats()
    h0 = before["routes"]["/health"]["requests"]  # the harness's readiness checks
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        for _ in range(200):
            assert c.get("/health").status_code == 200
        for _ in range(5):
            assert c.post("/v1/chat", json={"prompt": "Hello"}).status_code == 200

    # the burst's seconds close within a second or so; wait for them, boundedly
    def closed():
        d = srv.stats()
        r = d["routes"]
        done = (r["/health"]["window"]["requests"] == h0 + 200
                and r["/v1/chat"]["window"]["requests"] == 5)
        return d if done else None
    d = wait_for(closed, timeout=15, interval=0.3, what="the burst in the window")
    w = d["window"]
    assert w["requests"] >= 205
    assert sum(w["series"]["rps"]) == w["requests"]
    assert max(w["series"]["rps"]) > 0
    assert w["rps"] == round(w["requests"] / w["span"], 3) and w["rps"] > 0
    health = d["routes"]["/health"]["window"]
    assert health["rps"] == round((h0 + 200) / w["span"], 3)
    assert health["status"]["2xx"] == h0 + 200
    chat = d["routes"]["/v1/chat"]["window"]
    assert chat["requests"] == 5
    assert chat["latency_ms"]["p50"] >= 100  # >= 120 ms by construction
    assert w["latency_ms"]["p99"] >= 100     # 5 slow in ~210 responses: over 1 %
    echo = d["models"]["echo"]
    assert echo["window"]["requests"] == 5 and echo["window"]["tokens_out"] == 25
    assert echo["window"]["latency_ms"]["p50"] >= 100
    assert w["tokens_out"] == 25 and sum(w["series"]["tokens_out"]) == 25
    # per worker: the workers' windows add up to the total (no worker has died)
    assert sum(x["window"]["requests"] for x in d["workers"]) == w["requests"]
    # since start and the window agree while everything is inside the minute
    assert d["routes"]["/health"]["requests"] == h0 + 200


def test_allow_list_enforced(make_server):
    srv = make_server(workers=1, config={"stats": {"allow": ["10.0.0.0/8"]}})
    for path in ("/stats", "/metrics", "/dashboard", "/dashboard/app.js", "/dashboard/app.css"):
        status, headers, body = srv.request("GET", path, headers={"Accept": "application/json"})
        assert status == 403, path
        assert "127.0.0.1" in json.loads(body)["error"]["message"]
    assert srv.request("GET", "/health")[0] == 200
    srv.stop()

    ok = make_server(workers=1, config={"stats": {"allow": ["10.0.0.0/8", "127.0.0.1/32"]}})
    for path in ("/stats", "/metrics", "/dashboard"):
        assert ok.request("GET", path)[0] == 200, path


def test_dashboard_is_self_contained(server):
    status, headers, page = server.request("GET", "/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = page.decode()
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert "/dashboard/app.js" in refs and "/dashboard/app.css" in refs
    # nothing from elsewhere: every reference is this server's path or inline data
    assert all(r.startswith("/") or r.startswith("data:") for r in refs), refs
    for path, ctype in (("/dashboard/app.js", "text/javascript"), ("/dashboard/app.css", "text/css")):
        status, headers, body = server.request("GET", path)
        assert status == 200 and headers["content-type"].startswith(ctype)
        assert b"http://" not in body and b"https://" not in body
    status, _, js = server.request("GET", "/dashboard/app.js")
    assert b'fetch("/stats"' in js


def test_stats_window_shape(server):
    d = server.stats()
    w = d["window"]
    assert w["seconds"] == 60 and 1 <= w["span"] <= 60
    series = w["series"]
    assert len(series["t"]) == 60 and series["t"][-1] == d["timestamp"] - 1
    for key in ("rps", "p50", "p90", "p99", "tokens_out", "active_connections",
                "streams_active"):
        assert len(series[key]) == 60, key
    for wk in d["workers"]:
        assert set(wk["window"]) == {"requests", "rps", "rps_last", "latency_ms"}
        assert set(wk["latency_ms"]) == {"p50", "p90", "p99"}
        assert wk["process"]["open_fds"] > 0
    assert d["master"]["process"]["rss_bytes"] > 0
    assert "/health" in d["routes"] and "echo" in d["models"]


def test_metrics_over_keep_alive_and_head(server):
    # /metrics pipelined on a kept-alive connection after other requests
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resps = parse_responses(read_all(s, 10))
    assert [r[0] for r in resps] == [200, 200, 200]
    first, second = families(resps[1][2].decode()), families(resps[2][2].decode())
    n1 = sample(first, "neurohttp_http_requests", route="/metrics", status="2xx")
    assert sample(second, "neurohttp_http_requests", route="/metrics", status="2xx") == n1 + 1
    status, headers, body = server.request("HEAD", "/metrics")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000


def test_dead_worker_figures_survive_in_both_windows(make_server):
    srv = make_server(workers=2)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for _ in range(30):
            c.get("/health")
            c.get("/missing")
    before = srv.stats()
    h0 = before["routes"]["/health"]["requests"]
    victim = srv.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in srv.worker_pids() and len(srv.worker_pids()) == 2
             and srv.stats()["master"]["restarts"] == 1, timeout=30, what="a replacement worker")
    d = srv.stats()
    # since start: the master folded the dead worker's slot, nothing lost or doubled
    assert d["routes"]["/health"]["requests"] == h0
    assert d["routes"]["other"]["status"]["4xx"] == before["routes"]["other"]["status"]["4xx"]
    # the last minute keeps it too (the retired slot's ring), once its seconds have closed
    wait_for(lambda: srv.stats()["routes"]["/health"]["window"]["requests"] == h0, timeout=15,
             what="the dead worker's seconds in the window")
    status, _, body = srv.request("GET", "/metrics")
    fams = families(body.decode())
    assert sample(fams, "neurohttp_worker_restarts") == 1
    assert sample(fams, "neurohttp_http_requests", route="/health", status="2xx") == h0
    pids = {int(s.labels["pid"]) for s in fams["neurohttp_process_cpu_seconds"].samples
            if s.labels["role"] == "worker"}
    assert victim not in pids and pids == set(srv.worker_pids())


def test_models_counted_on_every_api(make_server):
    # the per-model figures come from the token pipeline: /v1/chat, the OpenAI API
    # (fast path and stream) and the WebSocket all count for their model
    from websockets.sync.client import connect
    srv = make_server(workers=1)
    msgs = [{"role": "user", "content": "Hello there"}]
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.post("/v1/chat/completions", json={"model": "echo", "messages": msgs}
                      ).status_code == 200
        with c.stream("POST", "/v1/chat/completions",
                      json={"model": "echo", "messages": msgs, "stream": True}) as r:
            assert b"[DONE]" in r.read()
        assert c.post("/v1/chat", json={"prompt": "Hi"}).status_code == 200
    with connect(f"ws://127.0.0.1:{srv.port}/v1/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"prompt": "Hi"}))
        deadline = 20
        while deadline:
            msg = json.loads(ws.recv(timeout=10))
            if msg.get("done"):
                break
            deadline -= 1
    d = wait_for(lambda: (lambda s: s if s["models"]["echo"]["requests"] == 4 else None)(
        srv.stats()), timeout=10, what="the WebSocket's request counted")
    echo = d["models"]["echo"]
    assert echo["errors"] == 0
    assert echo["tokens_in"] == d["tokens_in"] > 0
    assert echo["tokens_out"] == d["tokens_out"] == 4 * 5
    assert d["routes"]["/v1/chat/completions"]["status"]["2xx"] == 2
    assert d["routes"]["/v1/ws"]["status"]["1xx"] == 1  # the 101 that switched protocols
