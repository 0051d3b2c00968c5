"""Reloads and graceful stops with keep-alive clients (issue 9, item 3): clients that
reuse their connection, as locust, load balancers and the OpenAI SDK do, with no
retries. A draining worker answers what arrives with `Connection: close` and closes
an idle connection only when it reaches keepalive_timeout, as it would anyway, so no
client can send a request into a connection the server is closing.
"""

from __future__ import annotations

import signal
import socket
import time

from load import Load
from server import wait_for

ADDR = "127.0.0.1"


def wait_replaced(srv, old: set[int], n: int, timeout: float = 60) -> list[int]:
    def done():
        pids = srv.worker_pids()
        return pids if len(pids) == n and not (set(pids) & old) else None
    return wait_for(done, timeout, what=f"{n} workers, none of {sorted(old)}")


def test_reloads_lose_nothing_on_keep_alive_connections(make_server):
    srv = make_server(workers=2)
    load = Load([(ADDR, srv.port)], threads=32, pause=0.005, keep_alive=True).start()
    try:
        load.wait_requests(200, timeout=60)
        for _ in range(3):
            old = set(srv.worker_pids())
            srv.send_signal(signal.SIGHUP)
            wait_replaced(srv, old, 2)
            load.wait_requests(200, timeout=60)
    finally:
        counts = load.stop()
    print(dict(counts), "connections opened:", load.connects)
    assert not load.failed, dict(counts)
    assert counts["refused"] == 0 and counts["ok"] > 800
    # the connections were really reused: each client reconnects about once per reload
    assert load.connects < counts["ok"] / 4, (load.connects, dict(counts))
    assert srv.stats()["master"]["reloads"] == 3


def test_graceful_stop_with_keep_alive_clients_ends_within_graceful_timeout(make_server):
    """Idle keep-alive connections do not hold a stop past graceful_timeout (they are
    let run to keepalive_timeout, here longer), and busy clients lose nothing: their
    requests are answered with Connection: close, then their reconnects are refused."""
    graceful = 3.0
    srv = make_server(workers=2, config={"server": {"graceful_timeout": graceful,
                                                    "keepalive_timeout": 60.0}})
    idle = []
    for _ in range(4):
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        idle.append(s)
    load = Load([(ADDR, srv.port)], threads=8, pause=0.005, keep_alive=True).start()
    try:
        load.wait_requests(100, timeout=60)
        t0 = time.monotonic()
        code = srv.stop(signal.SIGTERM, timeout=graceful + 10)
        took = time.monotonic() - t0
    finally:
        counts = load.stop()
        for s in idle:
            s.close()
    print(dict(counts), f"stopped in {took:.2f}s")
    assert code == 0
    assert not load.failed, dict(counts)
    assert took < graceful + 2.5, f"the stop took {took:.1f}s (graceful_timeout {graceful}s)"
