"""/stats across real workers: the N+1 invariant, and no counter ever going backwards."""

from __future__ import annotations

import os
import signal
import time

from server import wait_for
from test_sockets import needs_ebpf

N = 40


def _per_worker_requests(stats: dict) -> dict[int, int]:
    return {w["pid"]: w["requests"] for w in stats["workers"]}


def counters(stats: dict) -> dict[str, float]:
    """Every figure of /stats that must never go down (gauges and percentiles excluded)."""
    out = {k: stats[k] for k in ("requests", "responses", "bytes_in", "bytes_out", "tokens_in",
                                 "tokens_out", "streams_total", "streams_cancelled",
                                 "connections_total", "errors_parse", "uptime", "timestamp")}
    out.update({f"status.{k}": v for k, v in stats["status"].items()})
    out["latency_ms.max"] = stats["latency_ms"]["max"]
    out.update({f"master.{k}": stats["master"][k] for k in ("reloads", "restarts", "generation",
                                                            "started", "pid")})
    return out


def assert_no_counter_down(before: dict, after: dict) -> None:
    a, b = counters(before), counters(after)
    down = {k: (a[k], b[k]) for k in a if b[k] < a[k]}
    assert not down, f"counters went down: {down}"


def test_n_plus_one_across_both_workers(make_server):
    srv = make_server(workers=2)
    before = srv.stats()
    for i in range(N):
        if i % 2:
            status, _, _ = srv.request("POST", "/v1/chat", body='{"prompt":"hi"}')
        else:
            status, _, _ = srv.request("GET", "/health")
        assert status == 200
    after = srv.stats()
    # The first read's request was counted before it was answered, the second's
    # response after its document was built: both sides move by exactly N+1.
    assert after["requests"] - before["requests"] == N + 1
    assert after["responses"] - before["responses"] == N + 1
    assert after["status"]["2xx"] - before["status"]["2xx"] == N + 1
    for cls in ("1xx", "3xx", "4xx", "5xx"):
        assert after["status"][cls] == before["status"][cls]
    assert after["tokens_out"] - before["tokens_out"] == (N // 2) * 5
    assert after["connections_total"] - before["connections_total"] == N + 1
    # Each fresh connection is hashed by the kernel to one of the two workers'
    # sockets; 40 of them all landing on one worker has odds of 2**-39.
    b, a = _per_worker_requests(before), _per_worker_requests(after)
    assert set(a) == set(b) == set(srv.worker_pids())
    moved = {pid: a[pid] - b[pid] for pid in a}
    assert all(n > 0 for n in moved.values()), moved
    assert sum(moved.values()) == N + 1


def test_status_classes_exact(make_server):
    srv = make_server(workers=2)
    before = srv.stats()
    for _ in range(5):
        assert srv.request("GET", "/nope")[0] == 404
    for _ in range(3):
        assert srv.request("POST", "/v1/chat", body="{bad")[0] == 400
    assert srv.request("DELETE", "/health")[0] == 405
    after = srv.stats()
    assert after["status"]["4xx"] - before["status"]["4xx"] == 9
    assert after["status"]["2xx"] - before["status"]["2xx"] == 1  # the first /stats read
    assert after["requests"] - before["requests"] == 10


def test_kill9_worker_replaced_within_a_second_counters_kept(make_server):
    srv = make_server(workers=2)
    for _ in range(20):
        assert srv.request("POST", "/v1/chat", body='{"prompt":"warm up"}')[0] == 200
    time.sleep(1.2)  # older than the master's start-failure window, so no back-off applies
    before = srv.stats()
    victim, survivor = srv.worker_pids()
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    def replaced() -> list[int]:
        pids = srv.worker_pids()
        return [p for p in pids if p not in (victim, survivor)]

    new = wait_for(replaced, timeout=10, interval=0.005, what="a replacement worker")[0]
    spawned = time.monotonic() - t0
    # serving: the replacement reports itself ready in the shared block
    wait_for(lambda: any(w["pid"] == new and w["state"] == "ready"
                         for w in srv.stats()["workers"]), timeout=10, interval=0.01,
             what="replacement ready")
    ready = time.monotonic() - t0
    print(f"replacement forked after {spawned * 1000:.0f} ms, ready after {ready * 1000:.0f} ms")
    # The master's loop wakes on SIGCHLD (wakeup fd) and forks at once: about a
    # millisecond when the machine is idle. The bound is one second; the
    # 1.5 s margin is for this 2-core machine shared by several test runs at once.
    assert spawned < 1.0 + 1.5, spawned
    after = srv.stats()
    assert_no_counter_down(before, after)
    assert after["master"]["restarts"] == before["master"]["restarts"] + 1
    assert after["requests"] >= before["requests"] + 1
    assert sorted(w["pid"] for w in after["workers"]) == sorted([survivor, new])
    assert "killed by signal 9" in srv.log()
    # Both serve: the N+1 invariant still holds with the retired slot folded in.
    s1 = srv.stats()
    for _ in range(10):
        assert srv.request("GET", "/health")[0] == 200
    s2 = srv.stats()
    assert s2["requests"] - s1["requests"] == 11 and s2["responses"] - s1["responses"] == 11


@needs_ebpf
def test_connections_are_split_evenly_between_workers(make_server):
    """Round-robin steering: 40 keep-alive connections land 20 on each worker,
    which the kernel's 4-tuple hash does not do (splits like 26/14 are common)."""
    import socket

    srv = make_server(workers=2)
    before = {w["pid"]: w["requests"] for w in srv.stats()["workers"]}
    conns = [socket.create_connection((srv.host, srv.port), timeout=5) for _ in range(40)]
    try:
        for c in conns:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        for c in conns:
            assert c.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for c in conns:
            c.close()
    after = {w["pid"]: w["requests"] for w in srv.stats()["workers"]}
    served = sorted(after[pid] - before.get(pid, 0) for pid in after)
    # the two /stats reads land on one worker or the other (+1 each)
    assert served[0] >= 20 and served[1] <= 22 and sum(served) == 41, served
