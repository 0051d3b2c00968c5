"""The router against real servers: a neurohttpd master whose models have
several deployments on real fake upstreams (tests/fake_upstream.py, each in
its own process; a deployment's upstream model name "fake:<spec>" picks what
the fake does for it). Each retry, fallback, breaker transition and hedge is
shown by what the upstream received and by the /stats "router" counters;
least_outstanding is checked across two workers; Retry-After is honoured; a
dead upstream is not hammered; the shared state survives a killed worker
and a reload, and is reset for a deployment whose table changed."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time

import httpx
import psutil
import pytest
from fake_upstream import FakeUpstream
from server import Server, wait_for

FLOOR = 3  # the retry budget's least retries per window (gateway/budget.py)

ASK = [{"role": "user", "content": "hello"}]


def dep(up: FakeUpstream, spec: str, **kw) -> dict:
    return {"base_url": up.url + "/v1", "model": "fake:" + spec, **kw}


def chat(srv: Server, model: str, stream: bool = False, timeout: float = 20) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions",
                      json={"model": model, "messages": ASK, "stream": stream}, timeout=timeout)


def sent(up: FakeUpstream, spec: str) -> int:
    """Requests the fake received for deployment model "fake:<spec>"."""
    return sum(1 for e in up.state()["log"] if (e["body"] or {}).get("model") == "fake:" + spec)


def router(srv: Server, model: str) -> dict:
    return srv.stats()["router"][model]


def deps(srv: Server, model: str) -> list[dict]:
    return router(srv, model)["deployments"]


@pytest.fixture
def up(fake_upstream):
    return fake_upstream


# ------------------------------------------------------------ retries
def test_a_retry_goes_to_another_deployment_before_the_first_byte(make_server, up):
    srv = make_server(workers=1, config={"models": {"r": {
        "retries": 1, "deployments": [dep(up, "status;code=500", breaker_failures=0),
                                      dep(up, "chat")]}}})
    for stream in (False, True, False, True):
        r = chat(srv, "r", stream)
        assert r.status_code == 200, r.text
        assert "You said: hello" in r.text or "tok" in r.text
    failed = sent(up, "status;code=500")
    assert failed == 2  # round robin: every other request went to it first, then on
    assert sent(up, "chat") == 4
    doc = router(srv, "r")
    assert doc["retries"] == 2 and doc["requests"] == 4 and doc["failed"] == 0
    d0, d1 = doc["deployments"]
    assert (d0["requests"], d0["errors"], d0["retries"]) == (2, 2, 0)
    assert (d1["requests"], d1["errors"], d1["retries"]) == (4, 0, 2)
    assert d0["outstanding"] == d1["outstanding"] == 0
    assert d0["origin"] == up.url
    metrics = srv.request("GET", "/metrics")[2].decode()
    assert 'neurohttp_router_retries_total{model="r"} 2' in metrics
    assert 'neurohttp_deployment_attempt_errors_total{model="r",deployment="0"} 2' in metrics


def test_no_retry_once_a_byte_went_to_the_client(make_server, up):
    srv = make_server(workers=1, config={"models": {"m": {
        "retries": 1, "deployments": [dep(up, "close_mid_stream;after=2"), dep(up, "chat")]}}})
    r = chat(srv, "m", stream=True)
    assert r.status_code == 200
    assert '"error"' in r.text  # the stream ends with an error event
    assert sent(up, "close_mid_stream;after=2") == 1 and sent(up, "chat") == 0
    doc = router(srv, "m")
    assert doc["retries"] == 0 and doc["deployments"][0]["errors"] == 1


def test_a_client_error_from_the_upstream_is_not_retried(make_server, up):
    srv = make_server(workers=1, config={"models": {"m": {
        "retries": 1, "fallbacks": ["echo"],
        "deployments": [dep(up, "status;code=401"), dep(up, "chat")]},
        "echo": {"provider": "echo"}}})
    r = chat(srv, "m")
    assert r.status_code == 502
    assert sent(up, "chat") == 0 and router(srv, "m")["fallbacks"] == 0


# ------------------------------------------------------------ Retry-After
def test_retry_after_skips_the_deployment_and_reaches_the_client(make_server, up):
    srv = make_server(workers=1, config={"models": {
        "two": {"retries": 1, "deployments": [dep(up, "status;code=429;retry_after=30"),
                                              dep(up, "chat")]},
        "one": {"deployments": [dep(up, "status;code=503;retry_after=30;id=1")]}}})
    for _ in range(6):
        assert chat(srv, "two").status_code == 200
    # asked once, then skipped for its 30 s: the other one served every request
    assert sent(up, "status;code=429;retry_after=30") == 1
    assert sent(up, "chat") == 6
    r = chat(srv, "one")
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    for _ in range(3):  # not asked again: the client gets 503 and the time left
        r = chat(srv, "one")
        assert r.status_code == 503
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert r.json()["error"]["message"]
    assert sent(up, "status;code=503;retry_after=30;id=1") == 1


def test_a_rate_limited_deployment_alone_gives_429_with_retry_after(make_server, up):
    srv = make_server(workers=2, config={"models": {"m": {
        "deployments": [dep(up, "status;code=429;retry_after=20")]}}})
    r = chat(srv, "m")
    assert r.status_code == 429 and r.headers["retry-after"] == "20"
    for _ in range(6):  # whichever worker: the shared record says wait
        r = chat(srv, "m")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 20
    assert sent(up, "status;code=429;retry_after=20") == 1


# ------------------------------------------------------------ fallbacks
def test_fallbacks_to_another_upstream_model_and_to_echo(make_server, up):
    srv = make_server(workers=1, config={"models": {
        "a": {"fallbacks": ["b"], "deployments": [dep(up, "status;code=500;id=a")]},
        "b": {"fallbacks": ["echo"], "deployments": [dep(up, "chat")]},
        "c": {"fallbacks": ["echo"], "deployments": [dep(up, "status;code=503;id=c")]},
        "echo": {"provider": "echo"}}})
    r = chat(srv, "a")
    assert r.status_code == 200 and "You said: hello" in r.text
    r = chat(srv, "a", stream=True)
    assert r.status_code == 200 and "tok0" in r.text
    r = chat(srv, "c")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == \
        "Hello, AI world!"
    assert r.json()["model"] == "c"  # the public name the client asked for
    assert sent(up, "status;code=500;id=a") == 2 and sent(up, "chat") == 2
    assert router(srv, "a")["fallbacks"] == 2
    assert router(srv, "c")["fallbacks"] == 1
    assert router(srv, "b")["requests"] == 2   # the fallback model counts its requests
    # a fallback chain follows the fallback's own fallbacks (a -> b -> echo)
    up.set_behaviour("status;code=500")
    srv2 = make_server(workers=1, config={"models": {
        "a": {"fallbacks": ["b"], "deployments": [dep(up, "status;code=500;id=a")]},
        "b": {"fallbacks": ["echo"], "deployments": [
            {"base_url": up.url + "/v1", "model": "plain"}]},
        "echo": {"provider": "echo"}}})
    r = chat(srv2, "a")
    assert r.status_code == 200 and "Hello, AI world!" in r.text


# ------------------------------------------------------------ the breaker
def test_breaker_opens_probes_half_open_and_closes(make_server, up):
    up.set_behaviour("status;code=500")
    srv = make_server(workers=2, config={"models": {"b": {"deployments": [{
        "base_url": up.url + "/v1", "model": "plain",
        # (a cool-down far longer than the few requests made inside it)
        "breaker_failures": 3, "breaker_cooldown_s": 4.0}]}}})
    for _ in range(3):
        assert chat(srv, "b").status_code == 502
    assert deps(srv, "b")[0]["breaker"] == "open"
    metrics = srv.request("GET", "/metrics")[2].decode()
    assert 'neurohttp_deployment_breaker_state{model="b",deployment="0",state="open"} 1' \
        in metrics
    n = up.state()["requests"]
    for _ in range(5):  # open: answered 503 at once, whichever worker, the upstream not asked
        r = chat(srv, "b")
        assert r.status_code == 503 and 1 <= int(r.headers["retry-after"]) <= 4
    assert up.state()["requests"] == n == 3
    # after the cool-down one request is the probe; it fails: open again
    wait_for(lambda: chat(srv, "b").status_code == 502, 20, interval=0.1,
             what="the half-open probe")
    d = deps(srv, "b")[0]
    assert (d["breaker"], d["breaker_probes"], d["breaker_opened"]) == ("open", 1, 2)
    assert up.state()["requests"] == 4
    # the upstream recovers: the next probe closes it
    up.set_behaviour("chat")
    wait_for(lambda: chat(srv, "b").status_code == 200, 20, interval=0.1,
             what="the probe that closes")
    d = deps(srv, "b")[0]
    assert (d["breaker"], d["breaker_probes"], d["breaker_closed"]) == ("closed", 2, 1)
    for _ in range(4):
        assert chat(srv, "b").status_code == 200


def test_only_one_probe_at_a_time(make_server, up):
    up.set_behaviour("status;code=500")
    srv = make_server(workers=2, config={"models": {"b": {"deployments": [{
        "base_url": up.url + "/v1", "model": "plain", "first_byte_timeout_s": 30.0,
        "breaker_failures": 1, "breaker_cooldown_s": 0.5}]}}})
    assert chat(srv, "b").status_code == 502
    up.set_behaviour("hang")  # the probe will hang
    time.sleep(0.6)  # past the cool-down (the state is read, not timed)
    with httpx.Client(timeout=30) as c:
        import threading
        probe = threading.Thread(target=lambda: _ignore(lambda: c.post(
            srv.url + "/v1/chat/completions", json={"model": "b", "messages": ASK})))
        probe.start()
        wait_for(lambda: up.state()["requests"] == 2, 10, what="the probe sent")
        for _ in range(6):  # while it hangs, no other request is let through
            assert chat(srv, "b").status_code == 503
        assert up.state()["requests"] == 2
        d = deps(srv, "b")[0]
        assert d["breaker"] == "half_open" and d["breaker_probes"] == 1
        up.set_behaviour("chat")
        # (the hanging probe is abandoned when the test ends)
    probe.join(timeout=35)


def _ignore(fn):
    try:
        fn()
    except httpx.HTTPError:
        pass


# ------------------------------------------------------------ hedging
def test_hedge_after_ms_sends_a_second_attempt_and_closes_the_loser(make_server, up):
    srv = make_server(workers=1, config={"models": {"h": {
        "hedge_after_ms": 200,
        "deployments": [dep(up, "hang", first_byte_timeout_s=60.0), dep(up, "chat")]}}})
    r = chat(srv, "h")  # round robin: to the hanging one first, hedged after 200 ms
    assert r.status_code == 200 and "You said: hello" in r.text
    # the loser's upstream connection was closed
    wait_for(lambda: up.state()["disconnects"] >= 1, 10, what="the loser closed")
    assert chat(srv, "h").status_code == 200  # to the answering one first: no hedge
    r = chat(srv, "h", stream=True)           # hanging one first again: hedged
    assert r.status_code == 200 and "tok" in r.text
    wait_for(lambda: up.state()["disconnects"] >= 2, 10, what="the loser closed")
    assert sent(up, "hang") == 2 and sent(up, "chat") == 3
    doc = router(srv, "h")
    assert doc["hedges"] == 2 and doc["deployments"][1]["hedges"] == 2
    wait_for(lambda: all(d["outstanding"] == 0 for d in deps(srv, "h")), 10,
             what="nothing outstanding")


# ------------------------------------------------------------ budget
def test_a_dead_upstream_is_not_hammered(make_server, up):
    srv = make_server(workers=2, config={"models": {
        # the breaker off: only the retry budget holds the retries back
        "d": {"retries": 3, "deployments": [
            dep(up, "status;code=500;id=1", breaker_failures=0),
            dep(up, "status;code=500;id=2", breaker_failures=0)]},
        # the breaker on: after 3 failures the upstream is left alone
        "e": {"retries": 3, "deployments": [
            dep(up, "status;code=500;id=3", breaker_failures=3, breaker_cooldown_s=600.0)]}}})
    n = 40
    for _ in range(n):
        assert chat(srv, "d").status_code == 502
    got = sent(up, "status;code=500;id=1") + sent(up, "status;code=500;id=2")
    # without the budget: 4 attempts a request (160); with it: 1 + 20 %, at least FLOOR
    assert n < got <= n + max(FLOOR, int(0.2 * n)) + 1
    doc = router(srv, "d")
    assert doc["retries"] == got - n and doc["retries_refused"] >= n - doc["retries"]
    for _ in range(20):
        assert chat(srv, "e").status_code in (502, 503)
    assert sent(up, "status;code=500;id=3") == 3


# ------------------------------------------------------------ strategies
def test_lowest_latency_measures_each_once_then_sends_to_the_fastest(make_server, up):
    srv = make_server(workers=2, config={"models": {"ll": {
        "strategy": "lowest_latency",
        "deployments": [dep(up, "delay;ms=300"), dep(up, "chat")]}}})
    for _ in range(10):  # fresh connections: both workers serve some
        assert chat(srv, "ll").status_code == 200
    # the slow one was measured once, by whichever worker: the figure is shared
    assert sent(up, "delay;ms=300") == 1 and sent(up, "chat") == 9
    slow, fast = deps(srv, "ll")
    assert slow["ttfb_ms"] >= 300 > fast["ttfb_ms"] > 0


def test_weighted_shares_requests_by_weight(make_server, up):
    srv = make_server(workers=1, config={"models": {"w": {
        "strategy": "weighted",
        "deployments": [dep(up, "chat", weight=3), dep(up, "chat;id=2", weight=1)]}}})
    for _ in range(8):
        assert chat(srv, "w").status_code == 200
    assert (sent(up, "chat"), sent(up, "chat;id=2")) == (6, 2)


# ------------------------------------------------------------ least_outstanding
def _holder(srv: Server, s: socket.socket) -> int:
    me = s.getsockname()
    for pid in srv.worker_pids():
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.raddr and (c.raddr.ip, c.raddr.port) == me:
                return pid
    raise AssertionError("no worker holds the connection")


def _post(s: socket.socket, model: str) -> None:
    body = json.dumps({"model": model, "messages": ASK}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_least_outstanding_counts_every_workers_requests(make_server, up):
    srv = make_server(workers=2, config={"models": {"lo": {
        "strategy": "least_outstanding",
        "deployments": [dep(up, "hang;id=a", first_byte_timeout_s=120.0),
                        dep(up, "hang;id=b", first_byte_timeout_s=120.0)]}}})
    socks: dict[int, list[socket.socket]] = {}
    opened: list[socket.socket] = []
    try:
        # connections held by each of the two workers (checked, not assumed)
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            opened.append(s)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(4096)
            socks.setdefault(_holder(srv, s), []).append(s)
            if len(socks) == 2 and all(len(v) >= 2 for v in socks.values()):
                break
        x, y = (v[:2] for v in socks.values())
        order = [x[0], y[0], x[1], y[1]]  # the workers take turns
        for k, s in enumerate(order, 1):
            _post(s, "lo")
            wait_for(lambda k=k: sent(up, "hang;id=a") + sent(up, "hang;id=b") == k, 10,
                     what=f"request {k} upstream")
            a, b = sent(up, "hang;id=a"), sent(up, "hang;id=b")
            # each new request went to the one with fewer in flight, whoever sent them
            assert abs(a - b) <= 1, (k, a, b)
        assert [d["outstanding"] for d in deps(srv, "lo")] == [2, 2]
        # a worker killed with requests in flight: the master drops its share
        victim = _holder(srv, y[0])
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in srv.worker_pids() and srv.ready_workers() == 2, 30,
                 what="worker replaced")
        wait_for(lambda: "left 2 outstanding upstream requests" in srv.log(), 10,
                 what="the master's fold")
        assert [d["outstanding"] for d in deps(srv, "lo")] == [1, 1]
        assert sum(d["requests"] for d in deps(srv, "lo")) == 4  # its counts kept
    finally:
        for s in opened:  # reset (not a half-close, after which the answer is still owed)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    # the clients went away before any answer: the attempts are cancelled
    wait_for(lambda: [d["outstanding"] for d in deps(srv, "lo")] == [0, 0], 10,
             what="outstanding back to 0")
    wait_for(lambda: up.state()["disconnects"] >= 2, 10, what="the upstream sees the closes")


# ------------------------------------------------------------ reloads and sizes
def test_a_reload_keeps_unchanged_deployments_state_and_resets_changed_ones(make_server, up):
    up.set_behaviour("status;code=500")

    def cfg(cooldown_b: float) -> dict:
        def one(name: str, cooldown: float) -> dict:
            return {"deployments": [{"base_url": up.url + "/v1", "model": name,
                                     "breaker_failures": 1, "breaker_cooldown_s": cooldown}]}
        return {"models": {"a": one("plain-a", 600.0), "b": one("plain-b", cooldown_b)}}

    srv = make_server(workers=2, config=cfg(600.0))
    assert chat(srv, "a").status_code == 502 and chat(srv, "b").status_code == 502
    assert [deps(srv, m)[0]["breaker"] for m in "ab"] == ["open", "open"]
    old = set(srv.worker_pids())
    srv.write_config(cfg(599.0))  # b's table changes, a's does not
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: not (old & set(srv.worker_pids())) and srv.ready_workers() == 2, 30,
             what="the new generation")
    a, b = deps(srv, "a")[0], deps(srv, "b")[0]
    assert (a["breaker"], a["errors"]) == ("open", 1)       # kept
    assert (b["breaker"], b["errors"]) == ("closed", 0)     # a new deployment: fresh
    n = up.state()["requests"]
    assert chat(srv, "a").status_code == 503 and up.state()["requests"] == n
    assert chat(srv, "b").status_code == 502 and up.state()["requests"] == n + 1


def test_router_state_sizes_follow_the_config_with_a_clear_error(make_server, up, tmp_path):
    import subprocess
    import sys
    two = {"deployments": [dep(up, "chat"), dep(up, "chat;id=2")]}
    bad = Server(tmp_path / "bad", workers=1,
                 config={"stats": {"max_deployments": 2}, "models": {"m": two}})
    bad.write_config()
    out = subprocess.run([sys.executable, "-m", "neurohttp", "check", "-c", str(bad.config_path)],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode != 0
    assert "stats.max_deployments = 2 is below the 3 records" in out.stdout + out.stderr
    # room for 4: the running config takes 3; a reload needing 3 new ones is refused
    srv = make_server(workers=1, config={"stats": {"max_deployments": 4}, "models": {"m": two}})
    # (the new file computes its own room, but the block was sized at start)
    srv.write_config({"models": {
        "m": two, "n": {"deployments": [dep(up, "chat;id=3"), dep(up, "chat;id=4")]}}})
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in srv.log(), 20, what="the refusal")
    assert "raise [stats] max_deployments and restart" in srv.log()
    assert chat(srv, "m").status_code == 200  # the running config serves on
    assert chat(srv, "n").status_code == 404


def test_a_reload_that_reorders_deployments_keeps_each_ones_figures_and_breaker(make_server, up):
    """Per-deployment figures and breakers are keyed by the deployment, not by
    its place in the list: a HUP that reverses the list keeps each one's
    counts, errors by kind and breaker under its own origin, and a deployment
    that replaces a removed one starts from zero."""
    with socket.socket() as s:  # a port nobody listens on: connect refused
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    a = dep(up, "chat;id=a")
    b = {"base_url": down + "/v1", "model": "down", "breaker_failures": 1,
         "breaker_cooldown_s": 600.0}
    c = dep(up, "chat;id=c")

    def cfg(*ds: dict) -> dict:
        return {"models": {"m": {"strategy": "round_robin", "deployments": list(ds)}}}

    def by_origin(srv: Server) -> dict[str, tuple]:
        st = srv.stats()
        figs = {d["origin"]: (d["requests"], d["errors"], d["errors_by_kind"])
                for d in st["deployments"].values()}
        brk = {d["origin"]: d["breaker"] for d in st["router"]["m"]["deployments"]}
        return {o: (*figs[o], brk[o]) for o in figs}

    def reload(srv: Server, config: dict) -> None:
        old = set(srv.worker_pids())
        srv.write_config(config)
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: not (old & set(srv.worker_pids())) and srv.ready_workers() == 2, 30,
                 what="the new generation")

    srv = make_server(workers=2, config=cfg(a, b))
    # until b's breaker opens, some requests go to b (502); then all go to a
    codes = [chat(srv, "m").status_code for _ in range(9)]
    assert set(codes) <= {200, 502} and 502 in codes
    before = by_origin(srv)
    assert before[down][3] == "open" and before[up.url][3] == "closed"
    assert before[down][1] >= 1 and before[down][2] == {"connect": before[down][1]}
    assert before[up.url][0] == codes.count(200) and before[up.url][1] == 0

    reload(srv, cfg(b, a))  # reversed
    after = by_origin(srv)
    assert after == before
    assert srv.stats()["deployments"]["m#0"]["origin"] == down
    assert chat(srv, "m").status_code == 200  # b's breaker still open: a answers
    assert by_origin(srv)[up.url][0] == before[up.url][0] + 1

    reload(srv, cfg(c, a))  # b removed, c (another upstream model) in its place
    st = srv.stats()
    new = st["deployments"]["m#0"]
    assert (new["upstream_model"], new["requests"], new["errors"], new["errors_by_kind"]) == \
        ("fake:chat;id=c", 0, 0, {})
    assert st["router"]["m"]["deployments"][0]["breaker"] == "closed"
    assert st["deployments"]["m#1"]["requests"] == before[up.url][0] + 1

    # b's workers are gone now: d is given b's figure blocks, cleared first
    d = dep(up, "chat;id=d")
    reload(srv, cfg(d, a))
    new = srv.stats()["deployments"]["m#0"]
    assert (new["upstream_model"], new["requests"], new["errors"], new["errors_by_kind"]) == \
        ("fake:chat;id=d", 0, 0, {})
    assert new["window"]["requests"] == 0
