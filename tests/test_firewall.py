"""The firewall ([firewall], docs/SECURITY.md "Firewall") against real servers.

Distinct client addresses are loopback addresses (127.0.0.2, 127.0.0.3, ...)
that the client socket binds before connecting; ::1 for IPv6. Which worker
holds a connection is read from the kernel (psutil) where it matters.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from server import Server, parse_responses, wait_for

Response = tuple[int, dict[str, str], bytes]


# ---------------------------------------------------------------- clients
def connect(srv: Server, src: str, timeout: float = 5.0) -> socket.socket:
    """A connection to the server from the loopback address `src`."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect((srv.host, srv.port))
    return s


def request_bytes(path: str = "/health", headers: dict[str, str] | None = None,
                  close: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def exchange(s: socket.socket, path: str = "/health",
             headers: dict[str, str] | None = None) -> Response:
    """One request on a keep-alive connection, and its response."""
    s.sendall(request_bytes(path, headers))
    r = http.client.HTTPResponse(s)
    r.begin()
    body = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def until_eof(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (a timeout fails the test)."""
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            return out
        if not b:
            return out
        out += b


def refused_at_once(srv: Server, src: str) -> Response:
    """Connect from `src` and send nothing: the server's answer, then its close."""
    with connect(srv, src) as s:
        data = until_eof(s)
    assert data, f"{src}: closed without an answer"
    (resp,) = parse_responses(data)
    return resp


def get(srv: Server, src: str, path: str = "/health",
        headers: dict[str, str] | None = None) -> Response:
    """One request on a fresh connection from `src`."""
    with connect(srv, src) as s:
        s.sendall(request_bytes(path, headers, close=True))
        (resp,) = parse_responses(until_eof(s))
    return resp


def pipelined(srv: Server, src: str, reqs: list[tuple[str, dict[str, str]]]) -> list[Response]:
    """Requests sent in one write on one connection (handled in one turn of the
    worker's loop: no refill of a rate between them)."""
    data = b"".join(request_bytes(p, h, close=i == len(reqs) - 1)
                    for i, (p, h) in enumerate(reqs))
    with connect(srv, src) as s:
        s.sendall(data)
        return parse_responses(until_eof(s))


def refused_counts(srv: Server) -> dict[str, int]:
    return srv.stats()["firewall"]["refused"]


def metric_counts(srv: Server) -> dict[str, int]:
    _, _, body = srv.request("GET", "/metrics")
    return {m.group(1): int(m.group(2)) for m in
            re.finditer(r'^neurohttp_firewall_refused_total\{rule="(\w+)"\} (\d+)$',
                        body.decode(), re.M)}


def holder(srv: Server, s: socket.socket) -> int:
    """The pid of the worker holding the server side of client socket `s`."""
    port = s.getsockname()[1]

    def find() -> int | None:
        for pid in srv.worker_pids():
            for c in psutil.Process(pid).net_connections("tcp"):
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED:
                    return pid
        return None
    return wait_for(find, 10, what=f"the worker holding port {port}")


def access_lines(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


BASE = {"server": {"keepalive_timeout": 30}}


def fw_config(**rules: Any) -> dict[str, Any]:
    return {**BASE, "firewall": rules}


# ---------------------------------------------------------------- allow / deny at accept
def test_allow_and_deny_are_checked_at_accept(make_server):
    """A denied or not-allowed peer gets 403 at once, without sending a byte, and
    the connection closed; deny wins over allow; others are served; the
    refusals are counted per rule in /stats and /metrics, and no worker died."""
    srv = make_server(workers=2, config=fw_config(
        allow=["127.0.0.1/32", "127.0.0.3/32", "127.0.0.64/26"],
        deny=["127.0.0.70/32", "127.0.0.100/30"]))
    pids = srv.worker_pids()
    for src, rule in (("127.0.0.70", "deny"), ("127.0.0.101", "deny"),
                      ("127.0.0.2", "allow"), ("127.0.0.4", "allow"), ("127.0.0.128", "allow")):
        before = refused_counts(srv)[rule]
        status, headers, body = refused_at_once(srv, src)
        assert status == 403, (src, status)
        assert headers["connection"] == "close"
        assert b"403 Forbidden" in body  # no request was read: the HTML page
        assert refused_counts(srv)[rule] == before + 1  # counted under its rule
    for src in ("127.0.0.3", "127.0.0.64", "127.0.0.99", "127.0.0.127"):
        assert get(srv, src)[0] == 200, src
    # a served connection stays a keep-alive one
    with connect(srv, "127.0.0.65") as s:
        assert [exchange(s)[0] for _ in range(3)] == [200, 200, 200]
    counts = refused_counts(srv)
    assert counts == {"allow": 3, "deny": 2, "conn_per_ip": 0, "ua": 0, "path": 0,
                      "rps_per_ip": 0}
    assert metric_counts(srv) == counts
    assert srv.worker_pids() == pids


def _start_on_ipv6(make_server, rules: dict[str, Any]) -> Server:
    """A server on [::1] whose readiness is read from its block (its /health may be refused)."""
    srv = make_server(workers=2, config=fw_config(**rules), bind="[::1]:0", start=False)
    srv.host = "::1"
    srv.start(wait=False)
    m = wait_for(lambda: re.search(r"listening on \[::1\]:(\d+)", srv.log()), 20,
                 what="listening")
    srv.port = int(m.group(1))
    wait_for(lambda: srv.ready_workers() == 2, 20, what="workers ready")
    time.sleep(0.25)  # one master loop: the steering includes them
    return srv


def test_ipv6_peers_are_matched_by_ipv6_networks(make_server):
    allowed = _start_on_ipv6(make_server, {"allow": ["::1/128"], "deny": ["10.0.0.0/8"]})
    assert get(allowed, "::1")[0] == 200
    refused = _start_on_ipv6(make_server, {"allow": ["127.0.0.0/8", "::ffff:0:0/96"]})
    assert refused_at_once(refused, "::1")[0] == 403
    denied = _start_on_ipv6(make_server, {"deny": ["::/127"]})
    assert refused_at_once(denied, "::1")[0] == 403


# ---------------------------------------------------------------- connections per IP
def test_connection_cap_per_ip_across_workers_and_a_killed_worker(make_server):
    """max_connections_per_ip = 3 on 2 workers: three connections from one
    address, held by both workers; a fourth is refused 429 at once, another
    address is unaffected. A kill -9 of a worker holding some of them frees
    exactly their counts (the master folds its share away)."""
    srv = make_server(workers=2, config=fw_config(max_connections_per_ip=3))
    src = "127.0.0.2"
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            s = connect(srv, src)
            assert exchange(s)[0] == 200
            held.append(s)
        # spread over both workers (round-robin steering; retried if it was not)
        for _ in range(30):
            if len({holder(srv, s) for s in held}) == 2:
                break
            held.pop(0).close()
            wait_for(lambda: get_status_or_none(srv, src) == 200, 10,
                     what="a count released by a close")
            s = connect(srv, src)
            assert exchange(s)[0] == 200
            held.append(s)
        holders = [holder(srv, s) for s in held]
        assert len(set(holders)) == 2
        status, headers, _ = refused_at_once(srv, src)
        assert status == 429 and headers["retry-after"] == "1"
        assert get(srv, "127.0.0.3")[0] == 200  # another address
        assert refused_counts(srv)["conn_per_ip"] == 1
        # kill -9 the worker holding the most of them
        victim = max(set(holders), key=holders.count)
        freed = holders.count(victim)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in srv.worker_pids() and len(srv.worker_pids()) == 2
                 and srv.ready_workers() == 2, 30, what="worker replaced")
        wait_for(lambda: f"left {freed} per-IP connection counts" in srv.log(), 10,
                 what="the master's fold")
        # exactly the dead worker's connections are free again
        fresh = []
        for _ in range(freed):
            s = connect(srv, src)
            assert exchange(s)[0] == 200
            fresh.append(s)
        held += fresh
        assert refused_at_once(srv, src)[0] == 429
        assert refused_counts(srv)["conn_per_ip"] == 2
    finally:
        for s in held:
            s.close()
    # every count is released when the connections end
    wait_for(lambda: all(get_status_or_none(srv, src) == 200 for _ in range(3)), 10,
             what="counts released")


def listening(pid: int) -> bool:
    """Whether process `pid` still holds a listening socket (and may accept)."""
    try:
        return any(c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(pid).net_connections("tcp"))
    except psutil.NoSuchProcess:
        return False


def get_status_or_none(srv: Server, src: str) -> int | None:
    try:
        return get(srv, src)[0]
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- requests per second per IP
def test_rps_per_ip_is_exact_across_workers(make_server):
    """rps_per_ip = 5: a burst of 20 requests from one address on 20 connections
    spread over both workers gets exactly 5 answers (the bucket, shared by the
    workers) while the burst lasts less than one refill; the rest 429 with
    Retry-After and the rate-limit headers, in the route's error shape."""
    srv = make_server(workers=2, config=fw_config(rps_per_ip=5))
    before = {w["pid"]: w["requests"] for w in srv.stats()["workers"]}
    conns = [connect(srv, "127.0.0.2") for _ in range(20)]
    try:
        assert len({holder(srv, s) for s in conns}) == 2
        t0 = time.monotonic()
        for s in conns:
            s.sendall(request_bytes("/health"))
        answers = []
        for s in conns:
            r = http.client.HTTPResponse(s)
            r.begin()
            r.read()
            answers.append((r.status, {k.lower(): v for k, v in r.getheaders()}))
        elapsed = time.monotonic() - t0
    finally:
        for s in conns:
            s.close()
    ok = sum(st == 200 for st, _ in answers)
    refused = [h for st, h in answers if st == 429]
    assert ok + len(refused) == 20
    # one refill every 0.2 s: exact while the burst lasted less than that
    assert 5 <= ok <= 5 + int(elapsed * 5) + 1
    if elapsed < 0.2:
        assert ok == 5
    for h in refused:
        assert int(h["retry-after"]) >= 1
        assert h["x-ratelimit-limit-requests"] == "5"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-reset-requests"].endswith("s")
    after = {w["pid"]: w["requests"] for w in srv.stats()["workers"]}
    assert all(after[p] > before.get(p, 0) for p in after)  # both workers answered some
    assert refused_counts(srv)["rps_per_ip"] == len(refused)
    # on /v1/*: OpenAI's shape; another address has its own bucket
    resps = pipelined(srv, "127.0.0.3", [("/v1/models", {})] * 6)
    assert [r[0] for r in resps] == [200] * 5 + [429]
    err = json.loads(resps[5][2])["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert "5 requests per second" in err["message"]
    assert resps[5][1]["retry-after"] == "1"


# ---------------------------------------------------------------- user agents and paths
def test_scanners_user_agents_and_paths_are_refused(make_server):
    srv = make_server(workers=2, config=fw_config(
        deny_user_agents=["nmap", "SQLMap", "nikto"], deny_paths=["/.env", "/admin", "/v1/files"]))
    src = "127.0.0.2"
    with connect(srv, src) as s:
        for ua in ("Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:Port Check)",
                   "sqlmap/1.7.2#stable (https://sqlmap.org)",
                   "Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)"):
            status, _, body = exchange(s, "/health", {"User-Agent": ua})
            assert status == 403, ua
        # the connection stays usable; other agents are served
        assert exchange(s, "/health", {"User-Agent": "curl/8.5.0"})[0] == 200
        assert exchange(s, "/health")[0] == 200
        for path in ("/.env", "/.env.production", "/admin", "/admin/login.php", "/%2eenv",
                     "/admin?x=1"):
            assert exchange(s, path)[0] == 403, path
        assert exchange(s, "/administrator")[0] == 403  # a prefix, as nginx's location
        assert exchange(s, "/v1/models")[0] == 200
        status, headers, body = exchange(s, "/v1/files")
        assert status == 403 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["type"] == "permission_error"
        status, headers, body = exchange(s, "/.env", {"Accept": "application/json"})
        assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
        # a scanner's agent on a route the router knows, sent twice in one request
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nUser-Agent: curl\r\n"
                  b"User-Agent: sqlmap\r\n\r\n")
        r = http.client.HTTPResponse(s)
        r.begin()
        r.read()
        assert r.status == 403
    counts = refused_counts(srv)
    assert counts["ua"] == 4 and counts["path"] == 9
    assert metric_counts(srv) == counts


# ---------------------------------------------------------------- X-Forwarded-For
def test_forwarded_for_is_believed_only_from_a_trusted_proxy(make_server, tmp_path):
    """The client behind trusted proxy 127.0.0.2 is X-Forwarded-For's right-most
    untrusted address: it is what the access log shows, what deny applies to
    and what the per-IP rate is keyed by. The same header from an untrusted
    peer, and X-Real-IP / Forwarded / True-Client-IP from anyone, are ignored."""
    log_path = tmp_path / "access.log"
    srv = make_server(workers=2, config={
        "log": {"access_log": str(log_path)},
        "firewall": {"trusted_proxies": ["127.0.0.2/32", "10.0.0.0/8"],
                     "deny": ["198.51.100.0/24"], "rps_per_ip": 1}})
    proxy, stranger = "127.0.0.2", "127.0.0.3"
    cases = [  # (peer, headers, expected client, status)
        (proxy, {"X-Forwarded-For": "203.0.113.5"}, "203.0.113.5", 200),
        (proxy, {"X-Forwarded-For": "198.51.100.7, 203.0.113.6"}, "203.0.113.6", 200),
        (proxy, {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}, "198.51.100.7", 403),
        (proxy, {"X-Forwarded-For": "198.51.100.1, 203.0.113.10, 10.1.2.3"},
         "203.0.113.10", 200),
        (proxy, {"X-Real-IP": "203.0.113.11"}, proxy, 200),
        (stranger, {"X-Forwarded-For": "198.51.100.7"}, stranger, 200),
    ]
    for i, (peer, headers, _, status) in enumerate(cases):
        got = get(srv, peer, f"/health?case={i}", headers)[0]
        assert got == status, (i, got)
    time.sleep(1.1)  # the stranger's bucket (1 per second) is full again
    spoof = {"X-Real-IP": "203.0.113.12", "Forwarded": "for=203.0.113.13",
             "True-Client-IP": "203.0.113.14", "X-Client-IP": "203.0.113.15"}
    assert get(srv, stranger, "/health?case=6", spoof)[0] == 200

    def logged() -> dict[int, str] | None:
        found = {}
        for line in access_lines(log_path):
            m = re.fullmatch(r"/health\?case=(\d+)", line["path"] or "")
            if m:
                found[int(m.group(1))] = line["client"]
        return found if len(found) == 7 else None
    clients = wait_for(logged, 10, what="the access log lines")
    assert [clients[i] for i in range(6)] == [c[2] for c in cases]
    assert clients[6] == stranger
    assert refused_counts(srv)["deny"] == 1
    # per-IP rate by the forwarded client: each of two clients behind the proxy
    # has its own bucket; a stranger's forged header does not give it one
    time.sleep(1.1)
    a = pipelined(srv, proxy, [("/health", {"X-Forwarded-For": "203.0.113.20"})] * 2)
    b = pipelined(srv, proxy, [("/health", {"X-Forwarded-For": "203.0.113.21"})] * 2)
    forged = pipelined(srv, stranger, [("/health", {"X-Forwarded-For": "203.0.113.22"}),
                                       ("/health", {"X-Forwarded-For": "203.0.113.23"})])
    assert [r[0] for r in a] == [200, 429]
    assert [r[0] for r in b] == [200, 429]
    assert [r[0] for r in forged] == [200, 429]


# ---------------------------------------------------------------- reload
def test_hup_applies_new_rules_without_losing_a_request(make_server):
    """HUP from no rules to deny + a user-agent rule + a connection cap: a client
    opening a fresh connection per request through the reload loses nothing;
    the new generation applies the new rules; a connection counted by the old
    generation still counts in the new one (the counts live in the block)."""
    # the loading client opens a connection per request, and a worker may see
    # its close only after the next ones are open (on the other worker, while
    # this one waits for a CPU): room for that, then as many held
    cap = 20
    cfg = fw_config(max_connections_per_ip=cap)
    srv = make_server(workers=2, config=cfg, cli_workers=False)
    srv.config["server"] = {**cfg["server"], "workers": 2}
    srv.write_config()
    assert get(srv, "127.0.0.2")[0] == 200
    assert get(srv, "127.0.0.4", headers={"User-Agent": "nikto"})[0] == 200
    held = [connect(srv, "127.0.0.5") for _ in range(cap)]  # counted by old workers
    assert [exchange(h)[0] for h in held] == [200] * cap
    stop = threading.Event()
    results: list[int | str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(get(srv, "127.0.0.3")[0])
            except Exception as e:  # a lost request
                results.append(repr(e))
    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: len(results) >= 20, 20, what="load running")
        old = set(srv.worker_pids())
        srv.config["firewall"] = {"deny": ["127.0.0.2/32"], "deny_user_agents": ["nikto"],
                                  "max_connections_per_ip": cap}
        srv.write_config()
        srv.send_signal(signal.SIGHUP)
        # the new generation serves (the old one drains: the held connection keeps
        # its worker until it closes)
        wait_for(lambda: len(set(srv.worker_pids()) - old) == 2 and srv.ready_workers() == 2,
                 40, what="the new generation ready")
        # the old workers stop accepting once their accept queues are empty
        wait_for(lambda: not any(listening(p) for p in old), 20, what="old workers not accepting")
        n = len(results)
        wait_for(lambda: len(results) >= n + 20, 20, what="load after the reload")
    finally:
        stop.set()
        t.join(30)
    assert results and all(r == 200 for r in results), [r for r in results if r != 200][:5]
    assert refused_at_once(srv, "127.0.0.2")[0] == 403
    assert get(srv, "127.0.0.4", headers={"User-Agent": "nikto"})[0] == 403
    # counted by the old generation, refused by the new one
    try:
        assert refused_at_once(srv, "127.0.0.5")[0] == 429
        # (counted before the poll below, whose tries may be refused until the
        # old workers see the held connections close)
        assert refused_counts(srv)["conn_per_ip"] == 1
    finally:
        for h in held:
            h.close()
    wait_for(lambda: get_status_or_none(srv, "127.0.0.5") == 200, 10,
             what="the held connection's count released")
    wait_for(lambda: not (set(srv.worker_pids()) & old), 40, what="the old generation gone")


# ---------------------------------------------------------------- TLS
def test_a_denied_peer_on_a_tls_listener_is_refused_after_the_handshake(tmp_path):
    """On a TLS listener the connection reaches the firewall once the handshake is
    done (the event loop hands it over then): a denied peer reads a 403 over TLS
    and the close; an allowed one is served."""
    from test_tls import HOST, PKI, TlsServer

    pki = PKI(tmp_path / "pki")
    srv = TlsServer(tmp_path / "srv", pki, sections={"firewall": {"deny": ["127.0.0.2/32"]}})
    try:
        srv.start()
        for src, status in (("127.0.0.2", 403), ("127.0.0.3", 200)):
            raw = socket.socket()
            raw.settimeout(10)
            raw.bind((src, 0))
            raw.connect((HOST, srv.tls_port))
            with pki.client_context().wrap_socket(raw, server_hostname=HOST) as s:
                if status == 403:
                    (resp,) = parse_responses(until_eof(s))
                else:
                    resp = exchange(s)
                assert resp[0] == status, src
        assert refused_counts(srv)["deny"] == 1
    finally:
        try:
            srv.stop()
        finally:
            srv.kill()
