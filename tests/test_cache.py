"""The response cache (ai/cache.py, docs/CACHE.md): identical non-streaming
chat requests to a model with cache_ttl_s answered from memory, marked
x-neurohttp-cache, bounded, counted in /stats and /metrics across workers.

The server tests talk to real neurohttpd servers over keep-alive connections
(a connection stays on one worker, and the cache is per worker)."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from typing import Any

import pytest
from server import Server, wait_for

from neurohttp import config
from neurohttp.ai.cache import Answer, ResponseCache, deterministic, request_key
from neurohttp.stats import layout as L

HEADER = "x-neurohttp-cache"


# ---------------------------------------------------------------- the pure parts
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def answer(text: str) -> Answer:
    return Answer(text, "stop", None, None, None, 3)


def test_key_ignores_key_order_and_nothing_else():
    msgs = [{"role": "user", "content": "hi"}]
    k = request_key("m", None, msgs, {"temperature": 0, "max_tokens": 5})
    assert k == request_key("m", None, [{"content": "hi", "role": "user"}],
                            {"max_tokens": 5, "temperature": 0})
    others = [request_key("n", None, msgs, {"temperature": 0, "max_tokens": 5}),
              request_key("m", "team-a", msgs, {"temperature": 0, "max_tokens": 5}),
              request_key("m", None, [{"role": "user", "content": "hi!"}],
                          {"temperature": 0, "max_tokens": 5}),
              request_key("m", None, msgs, {"temperature": 0, "max_tokens": 6}),
              request_key("m", None, msgs, {"temperature": 0, "max_tokens": 5, "seed": 1}),
              request_key("m", None, msgs, {"temperature": 0, "max_tokens": 5,
                                            "tools": [{"type": "function"}]})]
    assert len({k, *others}) == 1 + len(others)


@pytest.mark.parametrize("params,ok", [
    ({"temperature": 0}, True), ({"temperature": 0.0}, True), ({}, False),
    ({"temperature": 0.2}, False), ({"temperature": False}, False), ({"temperature": "0"}, False),
])
def test_only_temperature_zero_is_deterministic(params, ok):
    assert deterministic(params) is ok


def test_lru_bounds_and_expiry_counted_in_the_slot():
    slot = [0] * 64
    clock = Clock()
    c = ResponseCache(3, 10_000, slot, clock)
    for k in (b"a", b"b", b"c"):
        c.put(k, answer(k.decode() * 10), 60)
    assert c.get(b"a") is not None          # a is now the most recently used
    c.put(b"d", answer("d" * 10), 60)        # evicts b, the least recently used
    assert c.get(b"b") is None and c.get(b"a") is not None
    assert slot[L.S_CACHE_EVICTIONS] == 1 and slot[L.S_CACHE_ENTRIES] == 3
    assert slot[L.S_CACHE_BYTES] == c.bytes == 3 * (10 + 32)
    clock.t += 61
    assert c.get(b"a") is None               # past its ttl: dropped, a miss
    assert slot[L.S_CACHE_EXPIRED] == 1 and slot[L.S_CACHE_ENTRIES] == 2
    assert (slot[L.S_CACHE_HITS], slot[L.S_CACHE_MISSES]) == (2, 2)
    # the byte bound: one answer of 100 + 32 bytes leaves room for one more
    c = ResponseCache(100, 300, slot, clock)
    c.put(b"x", answer("x" * 100), 60)
    c.put(b"y", answer("y" * 100), 60)
    c.put(b"z", answer("z" * 100), 60)
    assert list(c.entries) == [b"y", b"z"] and c.bytes == 264
    c.put(b"big", answer("b" * 300), 60)     # larger than max_bytes alone: never kept
    assert list(c.entries) == [b"y", b"z"]
    c.clear()
    assert c.bytes == 0 and not c.entries


@pytest.mark.parametrize("text,needle", [
    ("[cache]\nmax_entries = 0\n", "cache.max_entries must be > 0"),
    ("[cache]\nmax_bytes = 10\n", "cache.max_bytes must be between 1024"),
    ("[cache]\nmax_bytes = \"1G\"\n", "cache.max_bytes must be an integer"),
    ("[models.m]\nprovider = \"echo\"\ncache_ttl_s = -1\n", "models.m.cache_ttl_s must be >= 0"),
    ("[models.m]\nprovider = \"echo\"\ncache_ttl_s = inf\n", "models.m.cache_ttl_s must be a finite"),
    ("[models.m]\nprovider = \"echo\"\ncache_nondeterministic = 1\n",
     "models.m.cache_nondeterministic must be true or false"),
])
def test_bad_cache_keys_name_the_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert needle in str(e.value) and str(path) in str(e.value)


# ---------------------------------------------------------------- real servers
MODELS: dict[str, Any] = {
    "echo": {"provider": "echo"},  # no cache
    "cached": {"provider": "echo", "cache_ttl_s": 60, "response": "{prompt} said"},
    "other": {"provider": "echo", "cache_ttl_s": 60, "response": "{prompt} said"},
    "loose": {"provider": "echo", "cache_ttl_s": 60, "cache_nondeterministic": True},
    "paced": {"provider": "echo", "cache_ttl_s": 60, "token_delay_ms": 1},
}


class Client:
    """One keep-alive connection (so one worker)."""

    def __init__(self, srv: Server) -> None:
        self.conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None
             ) -> tuple[int, str | None, Any]:
        raw = body if isinstance(body, str) else json.dumps(body)
        self.conn.request("POST", path, raw, {"Content-Type": "application/json",
                                              **(headers or {})})
        r = self.conn.getresponse()
        data = r.read()
        ctype = r.getheader("content-type") or ""
        return r.status, r.getheader(HEADER), \
            json.loads(data) if ctype.startswith("application/json") else data

    def chat(self, model: str, prompt: str, **extra: Any) -> tuple[int, str | None, Any]:
        return self.post("/v1/chat/completions",
                         {"model": model, "messages": [{"role": "user", "content": prompt}],
                          **extra})

    def close(self) -> None:
        self.conn.close()


def cache_stats(srv: Server) -> dict[str, Any]:
    return srv.stats()["cache"]


def test_hit_miss_header_and_usage(make_server, tmp_path):
    log = tmp_path / "access.log"
    srv = make_server(workers=1, config={"models": MODELS, "log": {"access_log": str(log)}})
    c = Client(srv)
    st, h, first = c.chat("cached", "one", temperature=0)
    assert (st, h) == (200, "miss")
    tokens = srv.stats()
    st, h, again = c.chat("cached", "one", temperature=0)
    assert (st, h) == (200, "hit")
    # the same answer and usage, with an id and created of its own
    assert again["choices"] == first["choices"] and again["usage"] == first["usage"]
    assert again["id"] != first["id"]
    assert again["object"] == "chat.completion" and again["model"] == "cached"
    # a hit is usage: its tokens are counted like the answer it repeats
    after = srv.stats()
    assert after["tokens_in"] - tokens["tokens_in"] == first["usage"]["prompt_tokens"]
    assert after["tokens_out"] - tokens["tokens_out"] == first["usage"]["completion_tokens"]
    # the model without cache_ttl_s: no header
    st, h, _ = c.chat("echo", "one", temperature=0)
    assert (st, h) == (200, None)
    # the seed API shares the entry when the provider gets the same request
    st, h, seed = c.post("/v1/chat", {"model": "cached", "prompt": "one", "temperature": 0})
    assert (st, h, seed["response"]) == (200, "hit", "one said")
    st, h, _ = c.post("/v1/chat", {"prompt": "one", "temperature": 0})  # default model echo
    assert (st, h) == (200, None)
    fig = cache_stats(srv)
    assert (fig["hits"], fig["misses"], fig["entries"]) == (2, 1, 1)
    assert fig["bytes"] == len("one said") + 32 and fig["models"] == {
        "cached": 60.0, "other": 60.0, "loose": 60.0, "paced": 60.0}
    c.close()
    srv.stop()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    chats = [x for x in lines if x["path"].startswith("/v1/chat")]
    assert [x.get("cache") for x in chats] == [None, "hit", None, "hit", None]
    assert chats[1]["tokens"] == chats[0]["tokens"] == first["usage"]["total_tokens"]


def test_key_order_normalised_and_every_field_counts(make_server):
    srv = make_server(workers=1, config={"models": MODELS})
    c = Client(srv)
    assert c.post("/v1/chat/completions",
                  '{"model":"cached","temperature":0,"max_tokens":50,'
                  '"messages":[{"role":"user","content":"k"}]}')[1] == "miss"
    assert c.post("/v1/chat/completions",
                  '{"messages":[{"content":"k","role":"user"}],"max_tokens":50,'
                  '"temperature":0,"model":"cached","stream":false}')[1] == "hit"
    # any other difference: a request of its own
    assert c.chat("cached", "k", temperature=0, max_tokens=49)[1] == "miss"
    assert c.chat("cached", "k", temperature=0, max_tokens=50, user="u1")[1] == "miss"
    assert c.chat("cached", "k", temperature=0, max_tokens=50, user="u2")[1] == "miss"
    assert c.chat("cached", "k ", temperature=0, max_tokens=50)[1] == "miss"
    assert c.chat("cached", "k", temperature=0, max_tokens=50, stop=["zz"])[1] == "miss"
    # a different model with the same body
    st, h, other = c.chat("other", "k", temperature=0, max_tokens=50)
    assert (st, h, other["model"]) == (200, "miss", "other")
    assert c.chat("other", "k", temperature=0, max_tokens=50)[1] == "hit"
    fig = cache_stats(srv)
    assert (fig["hits"], fig["misses"], fig["entries"]) == (2, 7, 7)
    c.close()


def test_no_cache_for_streams_or_temperature_above_zero(make_server):
    srv = make_server(workers=1, config={"models": MODELS})
    c = Client(srv)
    assert c.chat("cached", "s", temperature=0)[1] == "miss"
    # a stream of the same request is generated and sent as a stream, unmarked
    st, h, body = c.chat("cached", "s", temperature=0, stream=True)
    assert (st, h) == (200, None) and body.endswith(b"data: [DONE]\n\n")
    st, h, body = c.post("/v1/chat", {"model": "cached", "prompt": "s", "temperature": 0,
                                      "stream": True})
    assert (st, h) == (200, None) and b'"done":true' in body
    # sampled answers are not kept: temperature above 0, or none given
    for _ in range(2):
        st, h, _ = c.chat("cached", "s", temperature=0.7)
        assert (st, h) == (200, None)
        st, h, _ = c.chat("cached", "s")
        assert (st, h) == (200, None)
    # unless the model says its answers do not vary
    assert c.chat("loose", "s", temperature=0.7)[1] == "miss"
    assert c.chat("loose", "s", temperature=0.7)[1] == "hit"
    assert c.chat("loose", "s")[1] == "miss"
    assert c.chat("loose", "s")[1] == "hit"
    fig = cache_stats(srv)
    assert (fig["hits"], fig["misses"], fig["entries"]) == (2, 3, 3)
    c.close()


FLAKY = '''
from neurohttp.ai.providers import ProviderError


class Flaky:
    """Fails every other call (the first included)."""

    def __init__(self, options):
        self.calls = 0

    async def stream(self, messages, params):
        self.calls += 1
        if self.calls % 2:
            raise ProviderError("upstream_unavailable", "down for now", retry_after=1)
        yield "fine"


def setup(app, options):
    app.add_provider("flaky", Flaky)
'''


def test_errors_are_never_cached(make_server, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "flaky.py").write_text(FLAKY)
    srv = make_server(workers=1, config={
        "plugins": {"paths": [str(plugins)], "enabled": ["flaky"]},
        "models": {"echo": {"provider": "echo"},
                   "flaky": {"provider": "flaky", "cache_ttl_s": 60}}})
    c = Client(srv)
    st, h, body = c.chat("flaky", "e", temperature=0)
    assert (st, h) == (503, None) and body["error"]["code"] == "upstream_unavailable"
    st, h, body = c.chat("flaky", "e", temperature=0)      # the error was not kept
    assert (st, h, body["choices"][0]["message"]["content"]) == (200, "miss", "fine")
    st, h, body = c.chat("flaky", "e", temperature=0)      # the answer was
    assert (st, h, body["choices"][0]["message"]["content"]) == (200, "hit", "fine")
    # a 400 is answered before the cache is looked at
    st, h, body = c.chat("flaky", "e", temperature=0, max_tokens=10**6)
    assert (st, h) == (400, None)
    fig = cache_stats(srv)
    assert (fig["hits"], fig["misses"], fig["entries"]) == (1, 2, 1)
    c.close()


TOOLS = '''
from neurohttp.ai.providers import Delta, Finish, ToolCallDelta, Usage


class Tools:
    """Like an upstream: a tool call in pieces, its own usage, and how many calls it got."""

    def __init__(self, options):
        self.calls = 0

    async def stream(self, messages, params):
        self.calls += 1
        yield Delta(tool_calls=[ToolCallDelta(0, id=f"call_{self.calls}", name="lookup")])
        yield Delta(tool_calls=[ToolCallDelta(0, arguments='{"q": "x"}')])
        yield Usage(prompt_tokens=42, completion_tokens=7)
        yield Finish("tool_calls")


def setup(app, options):
    app.add_provider("tools", Tools)
'''


def test_tool_calls_and_upstream_usage_are_replayed(make_server, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tools.py").write_text(TOOLS)
    srv = make_server(workers=1, config={
        "plugins": {"paths": [str(plugins)], "enabled": ["tools"]},
        "models": {"echo": {"provider": "echo"},
                   "tools": {"provider": "tools", "cache_ttl_s": 60}}})
    c = Client(srv)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    st, h, miss = c.chat("tools", "t", temperature=0, tools=tools)
    assert (st, h) == (200, "miss")
    st, h, hit = c.chat("tools", "t", temperature=0, tools=tools)
    assert (st, h) == (200, "hit")
    # the provider was not called again (its call number is in the id), and
    # the answer and the provider's own usage are repeated exactly
    call = hit["choices"][0]["message"]["tool_calls"]
    assert call == [{"id": "call_1", "type": "function",
                     "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]
    assert hit["choices"] == miss["choices"] and hit["choices"][0]["finish_reason"] == "tool_calls"
    assert hit["choices"][0]["message"]["content"] is None
    assert hit["usage"] == miss["usage"] == {"prompt_tokens": 42, "completion_tokens": 7,
                                             "total_tokens": 49}
    c.close()


def test_expiry(make_server):
    srv = make_server(workers=1, config={"models": {
        "echo": {"provider": "echo"}, "brief": {"provider": "echo", "cache_ttl_s": 2}}})
    c = Client(srv)
    t0 = time.monotonic()
    assert c.chat("brief", "x", temperature=0)[1] == "miss"
    assert c.chat("brief", "x", temperature=0)[1] == "hit"
    # polled (bounded) until the entry has lapsed: never before its ttl
    wait_for(lambda: c.chat("brief", "x", temperature=0)[1] == "miss", timeout=20,
             interval=0.25, what="the entry to expire")
    assert time.monotonic() - t0 >= 2
    fig = cache_stats(srv)
    assert fig["expired"] == 1 and fig["entries"] == 1 and fig["misses"] == 2
    assert c.chat("brief", "x", temperature=0)[1] == "hit"  # kept again
    c.close()


def test_entry_and_byte_bounds_evict_lru(make_server):
    srv = make_server(workers=1, config={"models": MODELS, "cache": {"max_entries": 3}})
    c = Client(srv)
    for p in ("a", "b", "c"):
        assert c.chat("cached", p, temperature=0)[1] == "miss"
    assert c.chat("cached", "a", temperature=0)[1] == "hit"   # a: most recently used
    assert c.chat("cached", "d", temperature=0)[1] == "miss"  # evicts b
    assert c.chat("cached", "b", temperature=0)[1] == "miss"  # b is gone (evicts c)
    assert c.chat("cached", "a", temperature=0)[1] == "hit"
    fig = cache_stats(srv)
    assert (fig["entries"], fig["evictions"]) == (3, 2)
    c.close()
    srv.stop()

    # bytes: answers of 400 + len(" said") + 32 bytes, two fit in 1024
    srv = make_server(workers=1, config={"models": MODELS, "cache": {"max_bytes": 1024}})
    c = Client(srv)
    size = 400 + len(" said") + 32
    for p in ("x", "y", "z"):
        assert c.chat("cached", p * 400, temperature=0)[1] == "miss"
    fig = cache_stats(srv)
    assert (fig["entries"], fig["bytes"], fig["evictions"]) == (2, 2 * size, 1)
    assert c.chat("cached", "x" * 400, temperature=0)[1] == "miss"  # the evicted one
    assert c.chat("cached", "z" * 400, temperature=0)[1] == "hit"
    # an answer larger than max_bytes is never kept (and evicts nothing)
    assert c.chat("cached", "w" * 2000, temperature=0)[1] == "miss"
    assert c.chat("cached", "w" * 2000, temperature=0)[1] == "miss"
    fig = cache_stats(srv)
    assert (fig["entries"], fig["evictions"]) == (2, 2)
    c.close()


def test_figures_summed_across_two_workers(make_server):
    srv = make_server(workers=2, config={"models": MODELS})
    served: set[int] = set()
    clients = []

    def both_workers_served() -> bool:
        # a fresh connection (SO_REUSEPORT picks a worker), one prompt of its
        # own: a miss then a hit on that worker
        c = Client(srv)
        clients.append(c)
        n = len(clients)
        assert c.chat("cached", f"p{n}", temperature=0)[1] == "miss"
        assert c.chat("cached", f"p{n}", temperature=0)[1] == "hit"
        rows = srv.stats()["workers"]
        served.update(w["pid"] for w in rows if w["requests"] > 0)
        return len(served) >= 2

    wait_for(both_workers_served, timeout=60, interval=0, what="both workers to serve")
    n = len(clients)
    fig = cache_stats(srv)
    assert (fig["hits"], fig["misses"], fig["entries"]) == (n, n, n)
    assert fig["bytes"] == sum(len(f"p{i} said") + 32 for i in range(1, n + 1))
    st, _, metrics = srv.request("GET", "/metrics")
    text = metrics.decode()
    for line in (f"neurohttp_cache_hits_total {n}", f"neurohttp_cache_misses_total {n}",
                 f"neurohttp_cache_entries {n}", f"neurohttp_cache_bytes {fig['bytes']}",
                 "neurohttp_cache_evictions_total 0", "neurohttp_cache_expired_total 0"):
        assert line in text.splitlines(), line
    for c in clients:
        c.close()


def test_answers_are_kept_per_api_key(make_server):
    keys = {"team-a": "nh-test-key-" + "a" * 24, "team-b": "nh-test-key-" + "b" * 24}
    srv = make_server(workers=1, config={"models": MODELS, "auth": {"enabled": True, "keys": [
        {"name": n, "sha256": hashlib.sha256(k.encode()).hexdigest(), "tpm": 10**6}
        for n, k in keys.items()]}})
    c = Client(srv)
    body = {"model": "cached", "messages": [{"role": "user", "content": "secret"}],
            "temperature": 0}
    a = {"Authorization": f"Bearer {keys['team-a']}"}
    b = {"Authorization": f"Bearer {keys['team-b']}"}
    st, h, first = c.post("/v1/chat/completions", body, a)
    assert (st, h) == (200, "miss")
    assert c.post("/v1/chat/completions", body, a)[1] == "hit"
    # another key asking the same is not told (by a hit) what team-a asked
    assert c.post("/v1/chat/completions", body, b)[1] == "miss"
    # a hit is charged to the key's quotas like the answer it repeats
    fig = srv.stats()["auth"]["keys"]["team-a"]
    u = first["usage"]
    assert (fig["tokens_in"], fig["tokens_out"]) == (2 * u["prompt_tokens"],
                                                     2 * u["completion_tokens"]), fig
    c.close()


def test_paced_model_hit_skips_the_model(make_server):
    """A hit of a paced model is not generated again: its answer comes without
    the model's pacing (measured in loadtests/cache_bench.py; here only that
    the hit has the same answer and usage)."""
    srv = make_server(workers=1, config={"models": MODELS})
    c = Client(srv)
    st, h, miss = c.chat("paced", "p", temperature=0)
    st2, h2, hit = c.chat("paced", "p", temperature=0)
    assert (st, h, st2, h2) == (200, "miss", 200, "hit")
    assert hit["choices"] == miss["choices"] and hit["usage"] == miss["usage"]
    c.close()
