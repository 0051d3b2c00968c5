"""Quotas across machines: NeuroHTTP servers sharing one real redis-server
([state] backend = "redis"), and what they do when it stops answering."""

from __future__ import annotations

import json
import threading
import time

import pytest
from redis_server import redis_server  # noqa: F401  (fixture)
from server import wait_for
from test_auth import CHAT, KEY, auth_config, bearer


def redis_config(url: str, on_error: str = "fail_open", timeout_ms: int = 200, **key) -> dict:
    cfg = auth_config(**key)
    cfg["state"] = {"backend": "redis", "url": url, "on_redis_error": on_error,
                    "timeout_ms": timeout_ms}
    return cfg


def test_two_servers_on_one_redis_share_rpm_exactly(make_server, redis_server):  # noqa: F811
    """rpm = 10 for a key, two 2-worker servers sharing one Redis: one request
    on each first (so both surely admit some), then 38 clients at once split
    between them: exactly 10 admitted across both."""
    cfg = redis_config(redis_server.url, rpm=10)
    a = make_server(workers=2, config=cfg)
    b = make_server(workers=2, config=cfg)
    t0 = time.monotonic()
    first = [srv.request("POST", "/v1/chat", CHAT, bearer(KEY))[0] for srv in (a, b)]
    assert first == [200, 200]
    results: list[int] = []
    lock = threading.Lock()
    go = threading.Barrier(38)

    def one(srv) -> None:
        go.wait(10)
        status = srv.request("POST", "/v1/chat", CHAT, bearer(KEY), timeout=20)[0]
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one, args=((a, b)[i % 2],)) for i in range(38)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - t0
    assert len(results) == 38 and set(results) <= {200, 429}
    admitted = 2 + results.count(200)
    # one more request refills every 6 s: exactly 10 when the burst was quicker
    # (a slower one, on a loaded machine, may or may not have caught a refill)
    assert 10 <= admitted <= 10 + int(elapsed // 6), (admitted, elapsed)
    fa, fb = (s.stats()["auth"]["keys"]["team-a"] for s in (a, b))
    assert fa["requests"] + fb["requests"] == admitted
    # one more on either: refused, with the shared bucket's figures
    status, h, _ = a.request("POST", "/v1/chat", CHAT, bearer(KEY))
    if time.monotonic() - t0 < 6:
        assert status == 429 and h["x-ratelimit-remaining-requests"] == "0"
    assert b.stats()["auth"]["redis"] == {"errors": 0, "fail_open": 0, "fail_closed": 0}


@pytest.mark.parametrize("how", ["stopped", "paused"])
@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_redis_outage_follows_on_redis_error_within_the_timeout(make_server, redis_server,  # noqa: F811
                                                                policy, how):
    """Redis stopped (connections refused) or paused (SIGSTOP: connections hang)
    mid-run: keyed requests are admitted (fail_open) or refused 503
    (fail_closed), each within about the timeout, never hanging; counted in
    /metrics; and served by the rules again once Redis is back."""
    srv = make_server(workers=1, config=redis_config(redis_server.url, policy, 200, rpm=1000))
    assert srv.request("POST", "/v1/chat", CHAT, bearer(KEY))[0] == 200
    if how == "stopped":
        redis_server.stop()
    else:
        redis_server.pause()
    statuses = []
    for _ in range(5):
        t0 = time.monotonic()
        status, h, body = srv.request("POST", "/v1/chat", CHAT, bearer(KEY), timeout=10)
        took = time.monotonic() - t0
        assert took < 2.0, f"a request waited {took:.2f}s for a dead Redis (timeout 0.2 s)"
        statuses.append(status)
        if status == 503:
            err = json.loads(body)["error"]
            assert err["code"] == "quota_store_unavailable" and h["retry-after"] == "1"
    assert statuses == [200 if policy == "fail_open" else 503] * 5
    assert srv.request("GET", "/health")[0] == 200  # unkeyed routes never ask Redis
    figs = srv.stats()["auth"]["redis"]
    assert figs["errors"] >= 1
    assert figs[policy] == 5 and figs["fail_open" if policy == "fail_closed" else "fail_closed"] == 0
    metrics = srv.request("GET", "/metrics")[2].decode()
    assert f'neurohttp_redis_errors_total{{outcome="{policy}"}} 5' in metrics
    log = srv.log()
    assert "redis ([state] url) failed" in log
    assert log.count("redis ([state] url) failed") <= 3  # at most once a second
    # back: the rules apply again
    if how == "stopped":
        redis_server.start()
    else:
        redis_server.resume()

    def served() -> bool:  # admitted, and not by the policy
        before = srv.stats()["auth"]["redis"][policy]
        return srv.request("POST", "/v1/chat", CHAT, bearer(KEY))[0] == 200 and \
            srv.stats()["auth"]["redis"][policy] == before
    wait_for(served, 15, interval=0.3, what="admissions through Redis again")
