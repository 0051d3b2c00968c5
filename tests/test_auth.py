"""API keys and per-key quotas against real servers ([auth], docs/SECURITY.md):
401s in OpenAI's shape, a key's models, exact rpm across workers, counts kept
across a reload and a killed worker, the key in no log or page."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from server import Server, wait_for

KEY = "nh-test-Zq3Vb8Lr2Wm6Tp0Xs4Yc7Ka1Nd5Fg9Hj2Ee8Ru6Io3Pl"
OTHER = "nh-test-other-8Jk2Lm4Np6Qr8St0Uv2Wx4Yz6Ab8Cd0Ef2Gh4"
WRONG = "nh-test-wrong-5Tt5Tt5Tt5Tt5Tt5Tt5Tt5Tt5Tt5Tt5Tt5Tt5"
CHAT = b'{"prompt": "hello"}'


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def auth_config(**key_opts) -> dict:
    return {"auth": {"enabled": True, "keys": [
        {"name": "team-a", "sha256": sha(KEY), **key_opts},
        {"name": "team-b", "sha256": sha(OTHER), "models": ["echo"]}]},
        "models": {"echo": {"provider": "echo"}, "big": {"provider": "echo"}}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(body: bytes) -> dict:
    doc = json.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    return doc["error"]


def test_requests_without_a_good_key_get_401_in_openai_shape(make_server):
    srv = make_server(workers=1, config=auth_config())
    cases = [
        ({}, "missing_api_key", 'Bearer realm="neurohttp"'),
        (bearer(WRONG), "invalid_api_key", 'error="invalid_token"'),
        ({"Authorization": f"Basic {KEY}"}, "invalid_authorization_header", "invalid_request"),
        ({"Authorization": "Bearer"}, "invalid_authorization_header", "invalid_request"),
        ({"Authorization": "Bearer two words"}, "invalid_authorization_header", "invalid_request"),
        ({"x-api-key": "nh-not!ok"}, "invalid_authorization_header", "invalid_request"),
        ({"x-api-key": WRONG}, "invalid_api_key", "invalid_token"),
    ]
    for headers, code, challenge in cases:
        for path, body in (("/v1/chat", CHAT), ("/v1/chat/completions",
                           b'{"model":"echo","messages":[{"role":"user","content":"x"}]}')):
            status, h, resp = srv.request("POST", path, body, headers)
            assert status == 401, (headers, status, resp)
            err = error_of(resp)
            assert err["code"] == code and err["type"] == "invalid_request_error"
            assert challenge in h["www-authenticate"]
    # two Authorization fields: malformed, whatever each holds
    raw = srv.raw(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Length: 19\r\nConnection: close\r\n\r\n" + CHAT)
    assert raw.startswith(b"HTTP/1.1 401") and b"invalid_authorization_header" in raw
    # the good key, by either header, is served; /health stays open
    for headers in (bearer(KEY), {"x-api-key": KEY}, {"authorization": f"bearer  {KEY}"}):
        status, _, body = srv.request("POST", "/v1/chat", CHAT, headers)
        assert status == 200 and json.loads(body)["response"] == "Hello, AI world!"
    assert srv.request("GET", "/health")[0] == 200
    stats = srv.stats()["auth"]
    assert stats["unauthorized"] == {"missing": 2, "malformed": 9, "invalid": 4}
    assert stats["keys"]["team-a"]["requests"] == 3
    assert srv.worker_pids()  # still serving


def test_key_models_restrict_what_it_may_call(make_server):
    srv = make_server(workers=1, config=auth_config())
    msg = b'{"model":"big","messages":[{"role":"user","content":"x"}]}'
    assert srv.request("POST", "/v1/chat/completions", msg, bearer(KEY))[0] == 200
    status, _, body = srv.request("POST", "/v1/chat/completions", msg, bearer(OTHER))
    assert status == 403
    err = error_of(body)
    assert err["code"] == "model_not_allowed" and err["param"] == "model"
    assert OTHER not in body.decode()
    assert srv.request("POST", "/v1/chat", b'{"prompt":"x","model":"big"}', bearer(OTHER))[0] == 403
    assert srv.request("POST", "/v1/chat", CHAT, bearer(OTHER))[0] == 200  # the default: echo
    assert srv.request("GET", "/v1/models/big", None, bearer(OTHER))[0] == 403
    assert srv.request("GET", "/v1/models/echo", None, bearer(OTHER))[0] == 200
    listed = json.loads(srv.request("GET", "/v1/models", None, bearer(OTHER))[2])
    assert [m["id"] for m in listed["data"]] == ["echo"]
    listed = json.loads(srv.request("GET", "/v1/models", None, bearer(KEY))[2])
    assert [m["id"] for m in listed["data"]] == ["echo", "big"]
    assert srv.stats()["auth"]["keys"]["team-b"]["forbidden"] == 3


def test_protected_routes_are_configurable(make_server):
    cfg = auth_config()
    cfg["auth"]["protect"] = ["/"]
    cfg["auth"]["open"] = ["/health", "/v1/models"]
    srv = make_server(workers=1, config=cfg)
    assert srv.request("GET", "/health")[0] == 200
    assert srv.request("GET", "/v1/models")[0] == 200
    for path in ("/stats", "/metrics", "/dashboard", "/"):
        status, h, _ = srv.request("GET", path)
        assert status == 401 and "www-authenticate" in h, path
        assert srv.request("GET", path, None, bearer(KEY))[0] == 200, path
    # [stats] allow still applies to a good key
    cfg["stats"] = {"allow": ["10.0.0.0/8"]}
    srv2 = make_server(workers=1, config=cfg)
    assert srv2.request("GET", "/stats", None, bearer(KEY))[0] == 403



def test_rate_headers_of_one_key_never_reach_another(make_server):
    """/health protected: its answer is one object the handler shares between
    requests, so a key's x-ratelimit-* headers go on a copy. team-a (rpm) then
    team-b (no limits), alternating: team-b never sees team-a's figures, and
    team-a's headers appear once, not once more per request."""
    srv = make_server(workers=1, config=auth_config(rpm=1000))
    srv.config["auth"]["protect"] = ["/"]  # /health too (readiness was polled on it)
    srv.config["auth"]["open"] = []
    srv.write_config()
    old = set(srv.worker_pids())
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: not (set(srv.worker_pids()) & old) and srv.ready_workers() == 1, 30,
             what="reload done")
    assert srv.request("GET", "/health")[0] == 401
    for _ in range(3):
        status, h, _ = srv.request("GET", "/health", None, bearer(KEY))
        assert status == 200 and h["x-ratelimit-limit-requests"] == "1000"
        status, h, _ = srv.request("GET", "/health", None, bearer(OTHER))
        assert status == 200 and not [n for n in h if n.startswith("x-ratelimit")], h
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Connection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.lower().count(b"x-ratelimit-limit-requests:") == 1, raw



def test_a_key_removed_on_hup_stops_working(make_server):
    """The workers remember accepted keys (keys.py KeyRing): a key used many
    times on a keep-alive connection, then removed from the file and HUP: the
    old connection is closed with the old workers, and every new one gets 401."""
    srv = make_server(workers=2, config=auth_config())
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    for _ in range(5):
        conn.request("POST", "/v1/chat", CHAT, bearer(KEY))
        r = conn.getresponse()
        assert r.status == 200 and r.read()
    srv.config["auth"]["keys"] = [k for k in srv.config["auth"]["keys"] if k["name"] != "team-a"]
    srv.write_config()
    old = set(srv.worker_pids())
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: not (set(srv.worker_pids()) & old) and srv.ready_workers() == 2, 30,
             what="reload done")
    try:  # the old worker closed its idle connection when it drained
        conn.request("POST", "/v1/chat", CHAT, bearer(KEY))
        assert conn.getresponse().status == 401
    except (ConnectionError, http.client.HTTPException):
        pass
    conn.close()
    for _ in range(6):  # fresh connections reach both new workers
        assert srv.request("POST", "/v1/chat", CHAT, bearer(KEY))[0] == 401
        assert srv.request("POST", "/v1/chat", CHAT, bearer(OTHER))[0] == 200



def test_tpm_is_charged_as_tokens_stream_across_workers(make_server):
    """tpm = 60 (a bucket of 60 tokens, one back a second), a stream of 400
    tokens: once the client has 200 of them, fresh connections to both workers
    are refused 429 (tokens) with Retry-After while the stream still runs, so
    the tokens were charged as they streamed, not at the end; the stream itself
    finishes whole, and the key's figures count its tokens exactly."""
    cfg = auth_config(tpm=60)
    cfg["models"]["long"] = {"provider": "echo", "repeat": True, "split": "token",
                             "token_delay_ms": 5}
    srv = make_server(workers=2, config=cfg)
    body = json.dumps({"model": "long", "stream": True, "max_tokens": 400,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "go"}]})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    conn.request("POST", "/v1/chat/completions", body,
                 {**bearer(KEY), "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("x-ratelimit-limit-tokens") == "60"
    pieces, usage = 0, None

    def read_until(n: int) -> None:
        nonlocal pieces, usage
        while pieces < n:
            line = r.fp.readline()
            assert line, "the stream ended early"
            if not line.startswith(b"data: {"):
                continue
            doc = json.loads(line[6:])
            if doc["choices"] and doc["choices"][0]["delta"].get("content"):
                pieces += 1
            if doc.get("usage"):
                usage = doc["usage"]

    read_until(200)
    # at most SETTLE_S (0.2 s) of tokens, 40 at 5 ms each, are not charged yet: >= 160 are
    before = [w["requests"] for w in srv.stats()["workers"]]
    refused = [srv.request("POST", "/v1/chat", CHAT, bearer(KEY)) for _ in range(6)]
    after = [w["requests"] for w in srv.stats()["workers"]]
    assert pieces < 400 and not r.isclosed(), "the stream should still be running"
    for status, h, resp in refused:
        assert status == 429, (status, resp)
        assert error_of(resp)["type"] == "tokens"
        assert int(h["retry-after"]) >= 60  # 100+ tokens of debt, one back a second
        assert h["x-ratelimit-remaining-tokens"] == "0"
    # each worker answered some of them (the stats requests add at most 1 each)
    assert all(a - b >= 2 for a, b in zip(after, before, strict=True)), (before, after)
    read_until(400)
    while usage is None:  # the usage chunk, then [DONE]
        line = r.fp.readline()
        assert line, "no usage chunk"
        if line.startswith(b"data: {") and json.loads(line[6:]).get("usage"):
            usage = json.loads(line[6:])["usage"]
    assert usage["completion_tokens"] == 400
    conn.close()
    figs = wait_for(lambda: (f := srv.stats()["auth"]["keys"]["team-a"])["tokens_out"] == 400
                    and f, 10, what="the stream's figures")
    assert figs["tokens_in"] == usage["prompt_tokens"]
    assert figs["requests"] == 1 and figs["rate_limited"] == 6
    assert srv.request("POST", "/v1/chat", CHAT, bearer(KEY))[0] == 429  # still in debt


def _burst(srv: Server, n: int, headers: dict[str, str]) -> list[tuple[int, dict, bytes]]:
    """n clients at once, each on its own connection, one request each."""
    results: list[tuple[int, dict, bytes]] = []
    lock = threading.Lock()
    go = threading.Barrier(n)

    def one() -> None:
        go.wait(10)
        r = srv.request("POST", "/v1/chat", CHAT, headers, timeout=20)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    return results


def test_rpm_is_exact_across_workers(make_server):
    """rpm = 10, 50 clients at once on 2 workers: exactly 10 admitted."""
    srv = make_server(workers=2, config=auth_config(rpm=10))
    t0 = time.monotonic()
    results = _burst(srv, 50, bearer(KEY))
    elapsed = time.monotonic() - t0
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 50
    # one more request refills every 6 s: exactly 10 unless the burst took that long
    assert 10 <= len(ok) <= 10 + int(elapsed // 6), (len(ok), elapsed)
    for _, h, body in refused:
        assert 1 <= int(h["retry-after"]) <= 6
        assert h["x-ratelimit-limit-requests"] == "10"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-reset-requests"].endswith("s")
        err = error_of(body)
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
        assert "team-a" in err["message"] and KEY not in err["message"]
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for _, h, _ in ok)
    if len(ok) == 10:  # each admission saw the one before it (unless a refill came
        assert remaining == list(range(10)), (remaining, elapsed)  # (a burst slower than 6 s)
    figs = srv.stats()["auth"]["keys"]["team-a"]
    assert figs["requests"] == len(ok) and figs["rate_limited"] == len(refused)
    # both workers served the burst (the steering spreads connections)
    assert all(w["requests"] > 0 for w in srv.stats()["workers"])


def test_quota_state_survives_reload_and_a_killed_worker(make_server):
    """rpm = 2 (one request back every 30 s): spent, then HUP, then kill -9 of
    a worker; the key stays refused, since the counts live in the master's block."""
    srv = make_server(workers=2, config=auth_config(rpm=2), cli_workers=False)
    srv.config["server"] = {"workers": 2}
    srv.write_config()
    t0 = time.monotonic()
    assert [srv.request("POST", "/v1/chat", CHAT, bearer(KEY))[0] for _ in range(3)] \
        == [200, 200, 429]
    old = set(srv.worker_pids())
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: not (set(srv.worker_pids()) & old) and srv.ready_workers() == 2, 30,
             what="reload done")
    # fresh connections, so both new workers answer some
    after_reload = [srv.request("POST", "/v1/chat", CHAT, bearer(KEY)) for _ in range(6)]
    assert time.monotonic() - t0 < 29, "too slow to tell a refill from a reset"
    assert [r[0] for r in after_reload] == [429] * 6
    assert all(r[1]["x-ratelimit-remaining-requests"] == "0" for r in after_reload)
    victim = srv.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in srv.worker_pids() and len(srv.worker_pids()) == 2
             and srv.ready_workers() == 2, 30, what="worker replaced")
    after_kill = [srv.request("POST", "/v1/chat", CHAT, bearer(KEY))[0] for _ in range(6)]
    assert time.monotonic() - t0 < 29, "too slow to tell a refill from a reset"
    assert after_kill == [429] * 6
    figs = srv.stats()["auth"]["keys"]["team-a"]
    assert figs["requests"] == 2 and figs["rate_limited"] == 13


def test_the_key_is_in_no_log_and_no_page(make_server):
    """A session of good, wrong and malformed keys at debug level, then every
    log file and every page: neither key's text appears anywhere."""
    cfg = auth_config(rpm=3, tpm=1000)
    cfg["log"] = {"level": "debug", "error_log": "error.log", "access_log": "access.log"}
    srv = make_server(workers=2, config=cfg)
    secrets = [KEY, OTHER, WRONG, KEY[:20], sha(KEY)]
    for headers in (bearer(KEY), {"x-api-key": KEY}, bearer(WRONG), {"x-api-key": WRONG},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY} x"},
                    bearer(OTHER)):
        for path, body in (("/v1/chat", CHAT), ("/v1/chat?stream=1", b'{"prompt":"x","stream":true}'),
                           ("/v1/chat/completions",
                            b'{"model":"big","messages":[{"role":"user","content":"x"}]}'),
                           ("/v1/models", None), ("/nope", None)):
            status, h, resp = srv.request("POST" if body else "GET", path, body, headers)
            for s in secrets:
                assert s not in resp.decode(errors="replace"), (path, status)
                assert all(s not in v for v in h.values())
    pages = [srv.request("GET", p)[2].decode(errors="replace")
             for p in ("/stats", "/metrics", "/", "/dashboard", "/health")]
    assert "team-a" in pages[0] and "team-a" in pages[1]
    srv.stop()
    files = [srv.log_path, srv.tmp / "error.log", srv.tmp / "access.log"]
    texts = [Path(f).read_text(errors="replace") for f in files]
    assert '"key":"team-a"' in texts[2] and '"key":"team-b"' in texts[2]
    for text in texts + pages:
        for s in secrets:
            assert s not in text
