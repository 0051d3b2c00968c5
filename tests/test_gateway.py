"""The gateway's `openai` provider against real servers: a neurohttpd master
whose models are served by a real fake upstream (tests/fake_upstream.py) in
its own process. The official openai SDK, raw sockets, the seed API and the
WebSocket chat; errors, usage, cancellation, reloads and the key's secrecy."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from server import Server, wait_for
from streamtools import RawStream, data_events
from websockets.sync.client import connect

KEY = "sk-test-SECRET-0123456789abcdef"
ASK = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream_models(url: str, down: str) -> dict:
    def m(upstream: str, **kw) -> dict:
        return {"provider": "openai", "base_url": url + "/v1", "model": upstream,
                "api_key_env": "UP_KEY", **kw}
    return {
        "echo": {"provider": "echo"},
        "up": m("fake:chat", headers={"x-team": "blue"}),
        "up-tools": m("fake:tools"),
        "up-burst": m("fake:stream;count=20;burst=1"),
        "up-burst-error": m("fake:stream;count=5;burst=1;error_at=3"),
        "up-slow": m("fake:stream;count=100;delay_ms=100", max_connections=256),
        "up-429": m("fake:status;code=429;retry_after=7"),
        # a 429 without Retry-After: every request asks it again (the router
        # skips a deployment only for the time its Retry-After says)
        "up-429-bare": m("fake:status;code=429"),
        "up-500": m("fake:status;code=500"),
        "up-503": m("fake:status;code=503;retry_after=3"),
        "up-401": m("fake:status;code=401"),
        "up-400": m("fake:status;code=400"),
        "up-mid": m("fake:close_mid_stream;after=2"),
        "up-hang": m("fake:hang", first_byte_timeout_s=1.0),
        "up-down": m("x", base_url=down + "/v1", connect_timeout_s=2.0),
        "up-nokey": m("fake:chat", api_key_env="NEUROHTTP_TEST_UNSET_KEY"),
        "up-cached": m("fake:chat", cache_ttl_s=60),
        "up-nousage": m("fake:chat;usage=0"),
    }


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    fake = FakeUpstream(tmp_path_factory.mktemp("fake")).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, up):
    s = Server(tmp_path_factory.mktemp("gw"), workers=2,
               config={"models": upstream_models(up.url, f"http://127.0.0.1:{free_port()}")},
               env={"UP_KEY": KEY})
    s.start()
    yield s
    s.stop()
    s.assert_no_shm()


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="client-key", max_retries=0,
                         timeout=20)


def last_request(up: FakeUpstream, model: str) -> dict:
    return [e for e in up.state()["log"] if (e["body"] or {}).get("model") == model][-1]


# ------------------------------------------------------------ answers
def test_the_sdk_gets_exactly_the_upstreams_text_whole_and_streamed(srv, up, client):
    r = client.chat.completions.create(model="up", messages=ASK)
    assert r.choices[0].message.content == "You said: hello"
    assert r.model == "up" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 3  # the upstream's
    seen = last_request(up, "fake:chat")
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {KEY}"
    assert seen["headers"]["x-team"] == "blue"
    assert seen["body"]["messages"] == ASK and "stream" not in seen["body"]

    chunks = list(client.chat.completions.create(model="up", messages=ASK, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "tok0 tok1 tok2 tok3 tok4 "
    assert {c.model for c in chunks} == {"up"}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # the upstream's usage chunk is not forwarded
    seen = last_request(up, "fake:chat")
    assert seen["body"]["stream"] is True
    assert seen["body"]["stream_options"] == {"include_usage": True}


def test_usage_chunk_only_when_the_client_asks_with_the_upstreams_counts(srv, client):
    chunks = list(client.chat.completions.create(
        model="up", messages=ASK, stream=True, stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].choices == []
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (5, 5)


def test_an_answer_without_usage_is_counted_here_prompt_included(srv, client):
    """The prompt is counted here only when the upstream's answer does not say
    (Generation._count): then usage, /stats and the model's figures have the
    cl100k counts of the messages and of the text."""
    from neurohttp.ai import tokenizer
    ask = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": f"count me {time.monotonic()}"}]
    prompt = tokenizer.count_messages(ask)
    before = srv.stats()["models"]["up-nousage"]
    r = client.chat.completions.create(model="up-nousage", messages=ask)
    text = r.choices[0].message.content
    assert text == "You said: " + ask[1]["content"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, tokenizer.count(text))
    after = srv.stats()["models"]["up-nousage"]
    assert after["tokens_in"] - before["tokens_in"] == prompt
    assert after["tokens_out"] - before["tokens_out"] == tokenizer.count(text)


def test_fields_the_server_does_not_act_on_reach_the_upstream_unchanged(srv, up, client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    extra = dict(tools=tools, tool_choice="auto", response_format={"type": "json_object"},
                 seed=7, logprobs=True, top_logprobs=2, user="u-1", temperature=0.5,
                 parallel_tool_calls=False, max_completion_tokens=300, stop=["END"],
                 extra_body={"vendor_option": {"x": 1}})
    client.chat.completions.create(model="up", messages=ASK, **extra)
    body = last_request(up, "fake:chat")["body"]
    assert body == {"model": "fake:chat", "messages": ASK, "tools": tools,
                    "tool_choice": "auto", "response_format": {"type": "json_object"},
                    "seed": 7, "logprobs": True, "top_logprobs": 2, "user": "u-1",
                    "temperature": 0.5, "parallel_tool_calls": False,
                    "max_completion_tokens": 300, "stop": ["END"], "vendor_option": {"x": 1}}
    client.chat.completions.create(model="up", messages=ASK, max_tokens=9)
    body = last_request(up, "fake:chat")["body"]
    assert body["max_tokens"] == 9 and "max_completion_tokens" not in body


def test_tool_calls_round_trip_whole_and_streamed(srv, client):
    r = client.chat.completions.create(model="up-tools", messages=ASK)
    call = r.choices[0].message.tool_calls[0]
    assert (call.id, call.type, call.function.name, call.function.arguments) == \
        ("call_1", "function", "get_weather", '{"city": "Paris"}')
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    chunks = list(client.chat.completions.create(model="up-tools", messages=ASK, stream=True))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id == "call_1" and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_seed_api_and_websocket_chat_with_an_upstream_model(srv):
    st, _, body = srv.request("POST", "/v1/chat", json.dumps({"prompt": "yo", "model": "up"}))
    doc = json.loads(body)
    assert st == 200 and doc["response"] == "You said: yo" and doc["model"] == "up"
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    s = RawStream(srv.host, srv.port, "/v1/chat", {"prompt": "yo", "model": "up", "stream": True})
    try:
        lines = [json.loads(x) for x in s.lines()]
    finally:
        s.close()
    assert "".join(x.get("token", "") for x in lines) == "tok0 tok1 tok2 tok3 tok4 "
    assert lines[-1]["done"] and lines[-1]["usage"]["completion_tokens"] == 5
    s = RawStream(srv.host, srv.port, "/v1/chat", {"prompt": "yo", "model": "up", "stream": True},
                  headers={"Accept": "text/event-stream"})
    try:
        events = data_events(list(s.events()))
    finally:
        s.close()
    assert events[-1] == "[DONE]" and events[-2]["done"]
    with connect(f"ws://{srv.host}:{srv.port}/v1/ws") as ws:
        ws.send(json.dumps({"prompt": "yo", "model": "up"}))
        msgs = []
        while not msgs or "done" not in msgs[-1]:
            msgs.append(json.loads(ws.recv(timeout=10)))
    assert "".join(m.get("token", "") for m in msgs) == "tok0 tok1 tok2 tok3 tok4 "


def test_the_events_of_one_upstream_read_leave_in_one_write(srv):
    """An upstream that sends its whole stream at once (as nginx sends a fixed
    body): the 23 events go to the client as one chunk of the response body,
    not one chunk (one write) each; every event is still there, in order, and
    a WebSocket chat still gets one message per token."""
    s = RawStream(srv.host, srv.port, "/v1/chat/completions",
                  {"model": "up-burst", "messages": ASK, "stream": True})
    try:
        chunks = list(s.chunks())
    finally:
        s.close()
    body = b"".join(chunks).decode()
    events = data_events([e for e in body.split("\n\n") if e])
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if e["choices"])
    assert text == "".join(f"tok{i} " for i in range(20))
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    # the head's role chunk may go alone, then the upstream's read, then [DONE]
    assert len(chunks) <= 4, [c[:60] for c in chunks]
    with connect(f"ws://{srv.host}:{srv.port}/v1/ws") as ws:
        ws.send(json.dumps({"prompt": "yo", "model": "up-burst"}))
        msgs = []
        while not msgs or "done" not in msgs[-1]:
            msgs.append(json.loads(ws.recv(timeout=10)))
    assert [m["token"] for m in msgs[:-1]] == [f"tok{i} " for i in range(20)]


def test_an_error_event_inside_one_read_comes_after_the_events_before_it(srv):
    """The events before an upstream's error event in the same read reach the
    client, then the stream ends with an error event (not a retry: bytes went).
    (Passes on the code before batching too: it guards the batch's order.)"""
    s = RawStream(srv.host, srv.port, "/v1/chat/completions",
                  {"model": "up-burst-error", "messages": ASK, "stream": True})
    try:
        events = data_events(list(s.events()))
    finally:
        s.close()
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))
    assert text == "tok0 tok1 "
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and "overloaded" in errors[0]["error"]["message"]
    assert events.index(errors[0]) >= len(events) - 2  # the last event (or before [DONE])


def test_the_access_log_names_the_deployment_and_the_upstreams_counts(tmp_path, up):
    """Each proxied request's access line: the public model, the deployment that
    answered (origin and upstream model, never the key), the upstream's prompt
    and completion counts; whole and streamed."""
    path = tmp_path / "access.log"
    srv = Server(tmp_path / "srv", workers=1, env={"UP_KEY": KEY}, config={
        "log": {"access_log": str(path)},
        "models": {"up": {"provider": "openai", "base_url": up.url + "/v1",
                          "model": "fake:chat", "api_key_env": "UP_KEY"}}})
    srv.start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=20)
        c.chat.completions.create(model="up", messages=ASK)
        list(c.chat.completions.create(model="up", messages=ASK, stream=True))

        def lines():
            if not path.exists():
                return None
            got = [json.loads(x) for x in path.read_text().splitlines()]
            got = [x for x in got if x["path"] == "/v1/chat/completions"]
            return got if len(got) >= 2 else None
        whole, stream = wait_for(lines, 10, what="two access lines")[:2]
    finally:
        srv.stop()
    origin = up.url.rstrip("/")
    for x in (whole, stream):
        assert x["model"] == "up" and x["deployment"] == f"{origin} fake:chat"
        assert KEY not in json.dumps(x)
    assert (whole["prompt_tokens"], whole["completion_tokens"]) == (5, 3)  # the upstream's
    assert (stream["prompt_tokens"], stream["completion_tokens"]) == (5, 5)
    assert whole["tokens"] == 8


def test_models_lists_the_public_names(srv):
    names = [m["id"] for m in srv.get_json("/v1/models")["data"]]
    assert "up" in names and "up-tools" in names and "echo" in names
    assert not any(n.startswith("fake:") or "#" in n for n in names)


def test_an_upstream_models_answer_is_cached_with_the_upstreams_usage(srv, up, client):
    """cache_ttl_s on an openai model: the second identical request (temperature 0)
    is a hit with the same text and usage, and the upstream saw one request."""
    ask = [{"role": "user", "content": f"cache me {time.monotonic()}"}]

    def asked() -> int:
        return sum(1 for e in up.state()["log"]
                   if (e["body"] or {}).get("messages") == ask)
    raw = client.chat.completions.with_raw_response.create(
        model="up-cached", messages=ask, temperature=0)
    first = raw.parse()
    assert raw.headers["x-neurohttp-cache"] == "miss"
    # (2 workers: a worker that has not seen it yet misses once too)
    seen = [client.chat.completions.with_raw_response.create(
        model="up-cached", messages=ask, temperature=0) for _ in range(6)]
    hits = [r.parse() for r in seen if r.headers["x-neurohttp-cache"] == "hit"]
    assert hits, [r.headers["x-neurohttp-cache"] for r in seen]
    assert asked() <= 2
    for h in hits:
        assert h.choices[0].message.content == first.choices[0].message.content
        assert h.usage.prompt_tokens == first.usage.prompt_tokens
        assert h.usage.completion_tokens == first.usage.completion_tokens
        assert h.model == "up-cached"


# ------------------------------------------------------------ errors
@pytest.mark.parametrize("model,status,code", [
    ("up-429", 429, "rate_limited"), ("up-500", 502, "upstream_error"),
    ("up-503", 503, "upstream_unavailable"), ("up-401", 502, "upstream_error"),
    ("up-down", 502, "upstream_unreachable"), ("up-hang", 504, "upstream_timeout"),
    ("up-400", 400, "bad_request"), ("up-nokey", 500, "provider_error"),
])
def test_upstream_failures_get_their_status_and_an_openai_error_without_the_key(
        srv, model, status, code):
    for stream in (False, True):
        st, headers, body = srv.request("POST", "/v1/chat/completions", json.dumps(
            {"model": model, "messages": ASK, "stream": stream}))
        assert st == status, (model, stream, body)
        err = json.loads(body)["error"]
        assert err["code"] == code and err["message"]
        assert KEY not in body.decode() and "Bearer" not in body.decode()
        if model == "up-429":
            assert headers["retry-after"] == "7"
        if model == "up-503":
            assert headers["retry-after"] == "3"
        if model == "up-nokey":
            assert "'up-nokey'" in err["message"]
            assert "NEUROHTTP_TEST_UNSET_KEY" in err["message"]


def test_the_sdk_maps_upstream_failures_to_its_exceptions(srv, client):
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="up-429", messages=ASK)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="up-down", messages=ASK, stream=True)
    assert e.value.status_code == 502


def test_an_upstream_closing_mid_stream_ends_the_clients_stream_with_an_error_event(srv):
    s = RawStream(srv.host, srv.port, "/v1/chat/completions",
                  {"model": "up-mid", "messages": ASK, "stream": True})
    try:
        events = data_events(list(s.events()))  # ends: the last chunk comes, no hang
    finally:
        s.close()
    assert s.status == 200 and s.finished
    assert events[-1]["error"]["code"] == "upstream_error"
    assert "tok0" in json.dumps(events[:-1])
    s = RawStream(srv.host, srv.port, "/v1/chat",
                  {"prompt": "x", "model": "up-mid", "stream": True})
    try:
        lines = [json.loads(x) for x in s.lines()]
    finally:
        s.close()
    assert lines[-1]["error"]["code"] == "upstream_error"


def test_the_upstream_key_never_shows(srv):
    for model in ("up-401", "up-500", "up-down", "up-mid", "up"):
        srv.request("POST", "/v1/chat/completions",
                    json.dumps({"model": model, "messages": ASK}))
    for path in ("/stats", "/metrics", "/v1/models", "/"):
        _, _, body = srv.request("GET", path)
        assert KEY not in body.decode(), path
    log = wait_for(lambda: "'up-401'" in srv.log() and srv.log(),
                   what="the failures logged")  # failures are logged ...
    assert KEY not in log and "Bearer" not in log  # ... without the key


# ------------------------------------------------------------ cancellation
def test_a_client_disconnect_closes_the_upstream_connection(srv, up):
    before = up.state()["disconnects"]
    s = RawStream(srv.host, srv.port, "/v1/chat/completions",
                  {"model": "up-slow", "messages": ASK, "stream": True})
    events = s.events()
    next(events), next(events)  # the role chunk and a token: the stream runs
    s.close()
    up.wait_for(lambda st: st["disconnects"] > before, what="the upstream to see the close")


def test_a_cancelled_websocket_chat_closes_the_upstream_connection(srv, up):
    before = up.state()["disconnects"]
    with connect(f"ws://{srv.host}:{srv.port}/v1/ws") as ws:
        ws.send(json.dumps({"prompt": "yo", "model": "up-slow"}))
        assert "token" in json.loads(ws.recv(timeout=10))
    up.wait_for(lambda st: st["disconnects"] > before, what="the upstream to see the close")


def test_slow_upstream_streams_do_not_delay_health_on_the_same_worker(tmp_path, up):
    srv = Server(tmp_path / "one", workers=1,
                 config={"models": upstream_models(up.url, "http://127.0.0.1:9")},
                 env={"UP_KEY": KEY}).start()
    streams: list[RawStream] = []
    try:
        for _ in range(200):
            streams.append(RawStream(srv.host, srv.port, "/v1/chat/completions",
                                     {"model": "up-slow", "messages": ASK, "stream": True}))
        for s in streams:
            assert s.read_head()[0] == 200
        wait_for(lambda: srv.stats()["streams_active"] == 200, what="200 streams running")
        t0 = time.monotonic()
        assert srv.request("GET", "/health")[0] == 200
        assert time.monotonic() - t0 < 2.0  # (not stuck behind the streams: generous)
        for s in streams[:5]:  # and the streams still flow
            assert any("tok" in e for e in s.events())
    finally:
        for s in streams:
            s.close()
        srv.stop()


# ------------------------------------------------------------ reload
def test_hup_with_a_changed_deployment_list_is_picked_up_with_no_request_lost(tmp_path, up):
    other = FakeUpstream(tmp_path / "other").start()
    try:
        def models(url: str) -> dict:
            return {"m": {"strategy": "round_robin", "deployments": [
                {"base_url": url + "/v1", "model": "fake:chat", "api_key_env": "UP_KEY"}]}}
        srv = Server(tmp_path / "srv", workers=2, config={"models": models(up.url)},
                     env={"UP_KEY": KEY}).start()
        try:
            before = other.state()["requests"]
            srv.write_config({"models": {"m": {"deployments": [
                {"base_url": other.url + "/v1", "model": "fake:chat", "api_key_env": "UP_KEY"},
                {"base_url": other.url + "/v1", "model": "fake:chat", "api_key_env": "UP_KEY",
                 "weight": 2}]}}})
            old = set(srv.worker_pids())
            srv.send_signal(1)  # SIGHUP
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                deadline = time.monotonic() + 20
                sent = 0
                while time.monotonic() < deadline:
                    r = c.post("/v1/chat/completions", json={"model": "m", "messages": ASK})
                    assert r.status_code == 200, r.text  # not one lost during the reload
                    sent += 1
                    if not (old & set(srv.worker_pids())) and sent > 5:
                        break
            assert not (old & set(srv.worker_pids()))
            for _ in range(4):
                r = httpx.post(srv.url + "/v1/chat/completions",
                               json={"model": "m", "messages": ASK}, timeout=10)
                assert r.status_code == 200
            assert other.state()["requests"] >= before + 4  # the new list serves
        finally:
            srv.stop()
    finally:
        other.stop()


# ------------------------------------------------------------ check
def test_check_validates_the_router_keys(tmp_path):
    import subprocess
    import sys

    from server import ROOT

    def check(text: str, env: dict | None = None) -> subprocess.CompletedProcess:
        path = tmp_path / "c.toml"
        path.write_text(text)
        return subprocess.run([sys.executable, "-m", "neurohttp", "check", "-c", str(path)],
                              capture_output=True, text=True, timeout=30,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})})

    dep = '[[models.a.deployments]]\nbase_url = "http://127.0.0.1:1/v1"\n'
    r = check('[models.a]\nstrategy = "fastest"\n' + dep)
    assert r.returncode == 1 and "models.a.strategy must be one of" in r.stderr
    r = check('[models.a]\nfallbacks = ["nope"]\n' + dep)
    assert r.returncode == 1 and "models.a.fallbacks: unknown model 'nope'" in r.stderr
    r = check('[models.a]\nfallbacks = ["b"]\n' + dep + '[models.b]\nfallbacks = ["a"]\n'
              '[[models.b.deployments]]\nbase_url = "http://127.0.0.1:2/v1"\n')
    assert r.returncode == 1 and "cycle of fallbacks (a -> b -> a)" in r.stderr
    r = check('[models.a]\nprovider = "openai"\nbase_url = "http://u:p@127.0.0.1:1/v1"\n')
    assert r.returncode == 1 and "models.a.base_url" in r.stderr and "credentials" in r.stderr
    r = check('[models.a]\nprovider = "openai"\nbase_url = "ftp://x/v1"\n')
    assert r.returncode == 1 and "models.a.base_url" in r.stderr
    r = check('[models.a]\nbase_url = "http://127.0.0.1:1/v1"\n'
              '[[models.a.deployments]]\nbase_url = "http://127.0.0.1:1/v1"\n')
    assert r.returncode == 1 and "models.a.base_url" in r.stderr
    r = check('[models.a]\nprovider = "openai"\nca_file = "/nonexistent/ca.pem"\n')
    assert r.returncode == 1 and "models.a.ca_file" in r.stderr
    r = check('[models.a]\nprovider = "openai"\napi_key_env = "GW_CHECK_KEY"\n')
    assert r.returncode == 0 and "warning" in r.stderr and "GW_CHECK_KEY is not set" in r.stderr
    r = check('[models.a]\nprovider = "openai"\napi_key_env = "GW_CHECK_KEY"\n',
              {"GW_CHECK_KEY": "sk-x"})
    assert r.returncode == 0 and "warning" not in r.stderr


# ------------------------------------------------------------ figures
def test_per_deployment_figures_are_summed_across_workers(srv):
    def dep(name: str) -> dict:
        return srv.stats()["deployments"][name]
    ok0, bad0 = dep("up#0"), dep("up-429-bare#0")
    n = 8  # over fresh connections: the kernel spreads them over both workers
    for _ in range(n):
        assert srv.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "up", "messages": ASK, "stream": True}))[0] == 200
        assert srv.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "up-429-bare", "messages": ASK}))[0] == 429
    ok, bad = dep("up#0"), dep("up-429-bare#0")
    assert ok["requests"] - ok0["requests"] == n and ok["errors"] == ok0["errors"]
    assert ok["tokens_in"] - ok0["tokens_in"] == 5 * n  # the upstream's counts
    assert ok["tokens_out"] - ok0["tokens_out"] == 5 * n
    assert ok["ttfb_ms"]["p50"] > 0 and ok["latency_ms"]["p99"] >= ok["ttfb_ms"]["p50"]
    assert ok["origin"].startswith("http://127.0.0.1:") and "/v1" not in ok["origin"]
    assert (ok["upstream_model"], ok["model"]) == ("fake:chat", "up")
    assert bad["requests"] - bad0["requests"] == n and bad["errors"] - bad0["errors"] == n
    assert bad["errors_by_kind"]["status_429"] - bad0["errors_by_kind"].get("status_429", 0) == n
    assert "up#0" not in srv.stats()["models"]  # the public models only
    _, _, metrics = srv.request("GET", "/metrics")
    text = metrics.decode()
    assert 'neurohttp_deployment_requests_total{model="up",deployment="up#0"' in text
    assert 'kind="status_429"' in text and KEY not in text


def test_top_shows_the_deployments(srv):
    from rich.console import Console

    from neurohttp.top import CpuMeter, render
    srv.request("POST", "/v1/chat/completions", json.dumps({"model": "up", "messages": ASK}))
    console = Console(record=True, width=200)
    console.print(render(srv.stats(), srv.url, CpuMeter()))
    text = console.export_text()
    assert "deployments" in text
    line = next(x for x in text.splitlines() if x.lstrip().startswith("up#0"))
    assert "http://127.0.0.1:" in line


# ------------------------------------------------------------ https and pooling
def test_an_https_upstream_is_checked_against_its_ca_file(tmp_path):
    import trustme
    ca = trustme.CA()
    chain = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    tls = FakeUpstream(tmp_path / "tls", tls=(str(chain), str(chain))).start()
    try:
        base = f"https://localhost:{tls.port}/v1"
        srv = Server(tmp_path / "srv", workers=1, config={"models": {
            "trusted": {"provider": "openai", "base_url": base, "model": "fake:chat",
                        "ca_file": str(tmp_path / "ca.pem")},
            "untrusted": {"provider": "openai", "base_url": base, "model": "fake:chat",
                          "ca_file": str(tmp_path / "other-ca.pem")},
            "system": {"provider": "openai", "base_url": base, "model": "fake:chat"}}}).start()
        try:
            for model, status in (("trusted", 200), ("untrusted", 502), ("system", 502)):
                st, _, body = srv.request("POST", "/v1/chat/completions", json.dumps(
                    {"model": model, "messages": ASK}))
                assert st == status, (model, body)
            assert tls.state()["sni"] == "localhost" and tls.state()["alpn"] == "http/1.1"
            assert srv.stats()["deployments"]["untrusted#0"]["errors_by_kind"] == {"tls": 1}
        finally:
            srv.stop()
    finally:
        tls.stop()


def test_a_stale_pooled_connection_is_retried_once_on_a_new_one(tmp_path, up):
    srv = Server(tmp_path / "srv", workers=1, config={"models": {"m": {
        "provider": "openai", "base_url": up.url + "/v1", "model": "fake:close_next"}}}).start()
    try:
        before = up.state()["connections_total"]
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for _ in range(3):  # each request after the first finds its pooled connection dead
                r = c.post("/v1/chat/completions", json={"model": "m", "messages": ASK})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert up.state()["connections_total"] - before == 3
        assert srv.stats()["deployments"]["m#0"]["errors"] == 0
    finally:
        srv.stop()
