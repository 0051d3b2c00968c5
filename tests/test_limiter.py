"""plugins/limiter.py against real servers: exact across workers (and across
servers sharing Redis), keyed by client address, by a header, by route, with
per-route overrides and an allow list; the 429's shape and headers."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from redis_server import redis_server  # noqa: F401  (fixture)
from server import ROOT, wait_for

PLUGINS = str(ROOT / "plugins")
CHAT = json.dumps({"prompt": "hi"})


def limiter_config(**options: object) -> dict:
    return {"plugins": {"paths": [PLUGINS], "enabled": ["limiter"], "limiter": options}}


def burst_of(servers: list, n: int, headers_of=lambda i: {}, path: str = "/v1/chat"
             ) -> tuple[list[tuple[int, dict]], float]:
    """n clients at once (a barrier), spread over `servers`: (status, headers) each,
    and the seconds from the first to the last."""
    results: list[tuple[int, dict, dict]] = []
    lock = threading.Lock()
    go = threading.Barrier(n)
    t0 = time.monotonic()

    def one(i: int) -> None:
        srv = servers[i % len(servers)]
        h = headers_of(i)
        go.wait(10)
        status, headers, _ = srv.request("POST", path, CHAT, h, timeout=20)
        with lock:
            results.append((status, headers, h))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    return results, time.monotonic() - t0


def test_rpm_5_by_ip_is_exact_across_two_workers(make_server):
    srv = make_server(workers=2, config=limiter_config(rpm=5))
    results, elapsed = burst_of([srv], 30)
    statuses = Counter(s for s, _, _ in results)
    assert set(statuses) <= {200, 429}
    assert statuses[200] == 5 + int(elapsed // 12), (statuses, elapsed)  # one more per 12 s
    refused = next(h for s, h, _ in results if s == 429)
    assert refused["x-ratelimit-limit-requests"] == "5"
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused["retry-after"]) <= 12
    assert refused["x-ratelimit-reset-requests"].endswith("s")
    # both workers answered (the limit is one, not one per worker)
    assert all(w["requests"] > 0 for w in srv.stats()["workers"])
    # OpenAI's error shape on /v1/*
    status, h, body = srv.request("POST", "/v1/chat", CHAT)
    err = json.loads(body)["error"]
    assert status == 429 and err["type"] == "rate_limit_error"
    assert err["code"] == "rate_limit_exceeded" and "limit 5 per minute" in err["message"]
    # HTML elsewhere, like every error page; /health is never limited
    status, h, body = srv.request("GET", "/", headers={"Accept": "text/html"})
    assert status == 429 and h["content-type"].startswith("text/html") and b"<h1>429" in body
    assert srv.request("GET", "/health")[0] == 200
    assert srv.stats()["plugins"]["limiter"]["refused"] == statuses[429] + 2


def test_rpm_5_by_header_is_exact_per_value(make_server):
    srv = make_server(workers=2, config=limiter_config(rpm=5, key="header:x-tenant",
                                                       allow=["vip"]))
    tenants = ["a", "b", "c"]
    results, elapsed = burst_of([srv], 30, lambda i: {"x-tenant": tenants[i % 3]})
    ok = Counter(h["x-tenant"] for s, _, h in results if s == 200)
    assert ok == {t: 5 + int(elapsed // 12) for t in tenants}, (ok, elapsed)
    # on the allow list: never limited; no header: keyed by the address, not free
    assert all(srv.request("POST", "/v1/chat", CHAT, {"x-tenant": "vip"})[0] == 200
               for _ in range(8))
    plain = [srv.request("POST", "/v1/chat", CHAT)[0] for _ in range(7)]
    assert plain.count(200) in (5, 6) and plain[-1] == 429


def test_per_route_overrides_have_their_own_bucket(make_server):
    srv = make_server(workers=2, config=limiter_config(
        rpm=2, allow=["10.0.0.0/8"],
        routes={"/v1/chat/completions": {"rpm": 4, "burst": 4}, "/v1/models*": {"rpm": 1}}))
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    got = [srv.request("POST", "/v1/chat/completions", body)[0] for _ in range(5)]
    assert got == [200] * 4 + [429]
    assert [srv.request("GET", "/v1/models/echo")[0] for _ in range(2)] == [200, 429]
    assert [srv.request("POST", "/v1/chat", CHAT)[0] for _ in range(3)] == [200, 200, 429]


def test_two_servers_on_one_redis_share_the_limit(make_server, redis_server):  # noqa: F811
    cfg = limiter_config(rpm=5)
    cfg["state"] = {"backend": "redis", "url": redis_server.url, "timeout_ms": 500}
    a = make_server(workers=2, config=cfg)
    b = make_server(workers=2, config=cfg)
    results, elapsed = burst_of([a, b], 30)
    statuses = Counter(s for s, _, _ in results)
    assert set(statuses) <= {200, 429}
    assert statuses[200] == 5 + int(elapsed // 12), (statuses, elapsed)
    wait_for(lambda: a.stats()["plugins"]["limiter"]["refused"]
             + b.stats()["plugins"]["limiter"]["refused"] == statuses[429], 5,
             what="refusals counted per server")


def test_check_names_a_bad_limiter_option(tmp_path):
    from test_plugin_api import _check

    cfg = tmp_path / "n.toml"
    for table, expect in [
        ('key = "cookie"\n', "plugins.limiter.key: must be \"ip\", \"header:<name>\""),
        ("rpm = 0\n", "plugins.limiter.rpm: must be an integer of at least 1, not 0"),
        ('allow = ["10.0.0.0/33"]\n', "plugins.limiter.allow: '10.0.0.0/33' is not an address"),
        ('[plugins.limiter.routes]\n"/v1/chat" = { rmp = 5 }\n',
         "plugins.limiter.routes./v1/chat.rmp: unknown option"),
    ]:
        cfg.write_text(f'[plugins]\npaths = ["{PLUGINS}"]\nenabled = ["limiter"]\n\n'
                       f"[plugins.limiter]\n{table}")
        r = _check(cfg)
        assert r.returncode == 1 and expect in r.stderr and "(plugin 'limiter')" in r.stderr, \
            r.stderr
