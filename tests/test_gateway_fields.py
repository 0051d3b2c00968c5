"""The OpenAI API as it is through the gateway's `openai` provider: `n` > 1
(every choice the upstream returned, whole and streamed, its usage charged),
and the fields of an answer the server does not make itself (a reasoning
model's reasoning_content, annotations, logprobs, system_fingerprint,
service_tier) kept as the upstream sent them, whole and streamed. A real
neurohttpd, a real fake upstream (tests/fake_upstream.py), the official SDK
and raw HTTP."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import httpx
import openai
import pytest
from fake_upstream import RICH, FakeUpstream
from server import Server

ASK: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    fake = FakeUpstream(tmp_path_factory.mktemp("fake")).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, up):
    def m(upstream: str, **kw: Any) -> dict[str, Any]:
        return {"provider": "openai", "base_url": up.url + "/v1", "model": upstream,
                "api_key_env": "UP_KEY", **kw}
    s = Server(tmp_path_factory.mktemp("gw"), workers=1, config={"models": {
        "echo": {"provider": "echo"},
        "up-n": m("fake:chat;echo=0"),
        "up-rich": m("fake:chat;rich=1;echo=0"),
        "up-cached-n": m("fake:chat;echo=0", cache_ttl_s=60),
    }}, env={"UP_KEY": "sk-fields-key"})
    s.start()
    yield s
    s.stop()
    s.assert_no_shm()


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="client-key", max_retries=0,
                         timeout=20)


def tokens_out(srv: Server, model: str) -> int:
    return int(srv.stats()["models"].get(model, {}).get("tokens_out", 0))


def by_index(chunks: list[Any]) -> tuple[dict[int, str], dict[int, str]]:
    """A stream's text and finish_reason per choice index."""
    text: dict[int, str] = defaultdict(str)
    finish: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason is not None:
                finish[ch.index] = ch.finish_reason
    return dict(text), finish


# ------------------------------------------------------------ n > 1
def test_n_2_gets_every_choice_of_the_upstream_whole_and_streamed(srv, up, client):
    before = tokens_out(srv, "up-n")
    r = client.chat.completions.create(model="up-n", messages=ASK, n=2)
    assert [(c.index, c.message.content, c.finish_reason) for c in r.choices] == \
        [(0, "You said: hello", "stop"), (1, "You said: hello #1", "stop")]
    assert r.model == "up-n" and r.id.startswith("chatcmpl-") and r.id != "chatcmpl-fake"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 7)  # the upstream's
    seen = [e for e in up.state()["log"] if (e["body"] or {}).get("model") == "fake:chat;echo=0"]
    assert seen[-1]["body"]["n"] == 2

    chunks = list(client.chat.completions.create(
        model="up-n", messages=ASK, n=2, stream=True, stream_options={"include_usage": True}))
    text, finish = by_index(chunks)
    assert text == {0: "tok0 tok1 tok2 tok3 tok4 ", 1: "tok0#1 tok1#1 tok2#1 tok3#1 tok4#1 "}
    assert finish == {0: "stop", 1: "stop"}
    assert {c.model for c in chunks} == {"up-n"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != "chatcmpl-fake"
    roles = {ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"}
    assert roles == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # what was charged is the upstream's usage, all choices
    assert tokens_out(srv, "up-n") - before == 7 + 10


def test_n_above_1_is_refused_by_a_model_that_answers_one_choice(srv, client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="echo", messages=ASK, n=2, stream=stream)
        assert e.value.status_code == 400 and e.value.param == "n"
        assert e.value.type == "invalid_request_error"
        assert "'echo'" in e.value.message and "n=1" in e.value.message
    r = client.chat.completions.create(model="echo", messages=ASK, n=1)  # n=1 is fine
    assert len(r.choices) == 1
    assert len(client.chat.completions.create(model="up-n", messages=ASK, n=3).choices) == 3


def test_an_n_2_answer_is_cached_with_every_choice(srv, up, client):
    ask = [{"role": "user", "content": "cache both"}]
    first = client.chat.completions.with_raw_response.create(
        model="up-cached-n", messages=ask, n=2, temperature=0)
    second = client.chat.completions.with_raw_response.create(
        model="up-cached-n", messages=ask, n=2, temperature=0)
    assert (first.headers["x-neurohttp-cache"], second.headers["x-neurohttp-cache"]) == \
        ("miss", "hit")
    a, b = first.parse(), second.parse()
    assert [c.message.content for c in b.choices] == [c.message.content for c in a.choices] \
        == ["You said: cache both", "You said: cache both #1"]
    assert b.usage.completion_tokens == a.usage.completion_tokens == 4 + 5  # the upstream's
    # n is in the key: n=1 is another answer
    one = client.chat.completions.with_raw_response.create(
        model="up-cached-n", messages=ask, temperature=0)
    assert one.headers["x-neurohttp-cache"] == "miss" and len(one.parse().choices) == 1


# ------------------------------------------------------------ fields kept
def test_reasoning_annotations_logprobs_and_fingerprint_round_trip_whole_and_streamed(
        srv, client):
    r = client.chat.completions.create(model="up-rich", messages=ASK)
    msg = r.choices[0].message
    assert msg.content == "You said: hello"
    assert msg.reasoning_content == RICH["reasoning_content"]
    assert [a.url_citation.url for a in msg.annotations] == ["https://example.com/a"]
    assert r.choices[0].logprobs.content[0].token == "You"
    assert r.system_fingerprint == "fp_fake_rich" and r.service_tier == "default"
    assert r.model == "up-rich" and r.id != "chatcmpl-fake"
    # exactly as the upstream sent them (raw JSON), the server's own fields its own
    doc = httpx.post(srv.url + "/v1/chat/completions", timeout=20,
                     json={"model": "up-rich", "messages": ASK}).json()
    c0 = doc["choices"][0]
    assert c0["message"]["annotations"] == RICH["annotations"]
    assert c0["logprobs"] == RICH["logprobs"]
    assert {k: doc[k] for k in RICH["top"]} == RICH["top"]
    assert doc["object"] == "chat.completion" and doc["model"] == "up-rich"
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    # with n=2, the other choice as the upstream sent it
    doc = httpx.post(srv.url + "/v1/chat/completions", timeout=20,
                     json={"model": "up-rich", "messages": ASK, "n": 2}).json()
    assert [c["message"]["reasoning_content"] for c in doc["choices"]] == \
        [RICH["reasoning_content"]] * 2
    assert doc["choices"][1]["message"]["annotations"] == RICH["annotations"]
    assert doc["choices"][1]["logprobs"] == RICH["logprobs"]

    # streamed: the same fields, as streams already kept them, and with n=2
    # each choice's reasoning
    chunks = list(client.chat.completions.create(model="up-rich", messages=ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == \
        RICH["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == "tok0 tok1 tok2 tok3 tok4 "
    notes = [a for d in deltas for a in (getattr(d, "annotations", None) or [])]
    assert [a["url_citation"]["url"] for a in notes] == ["https://example.com/a"]
    # every chunk that carried the upstream's fields shows them
    assert {c.system_fingerprint for c in chunks if c.system_fingerprint} == {"fp_fake_rich"}
    assert {c.service_tier for c in chunks if c.service_tier} == {"default"}
    assert {c.model for c in chunks} == {"up-rich"}
    chunks = list(client.chat.completions.create(model="up-rich", messages=ASK, stream=True,
                                                 n=2))
    reasoning = {ch.index: getattr(ch.delta, "reasoning_content", None)
                 for c in chunks for ch in c.choices
                 if getattr(ch.delta, "reasoning_content", None)}
    assert reasoning == {0: RICH["reasoning_content"], 1: RICH["reasoning_content"]}


def test_n_above_1_is_refused_while_a_plugin_filters_tokens(tmp_path, up):
    """A token filter sees one text: choices 1..n-1 would pass it unfiltered."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "shout.py").write_text(
        "def setup(app, options):\n"
        "    app.on_token(lambda request, token: token.upper())\n")
    s = Server(tmp_path / "srv", workers=1, config={
        "plugins": {"paths": [str(plugins)], "enabled": ["shout"]},
        "models": {"up-n": {"provider": "openai", "base_url": up.url + "/v1",
                            "model": "fake:chat;echo=0", "api_key_env": "UP_KEY"}}},
        env={"UP_KEY": "sk-fields-key"})
    s.start()
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0, timeout=20)
        sent = up.state()["requests"]
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="up-n", messages=ASK, n=2, stream=stream)
            assert e.value.param == "n" and "on_token" in e.value.message
        assert up.state()["requests"] == sent  # nothing went upstream
        r = client.chat.completions.create(model="up-n", messages=ASK)
        assert r.choices[0].message.content == "YOU SAID: HELLO"
        # streamed (each upstream event a provider-counted Text): filtered, and
        # the usage still the upstream's
        chunks = list(client.chat.completions.create(
            model="up-n", messages=ASK, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            "TOK0 TOK1 TOK2 TOK3 TOK4 "
        assert chunks[-1].usage.completion_tokens == 5
    finally:
        s.stop()
