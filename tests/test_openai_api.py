"""The OpenAI-compatible API driven by the official `openai` SDK, sync and async,
against a real 2-worker server."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server import Server

from neurohttp.ai import tokenizer

LONG_TEXT = "Streaming is the product: it must never buffer, never leak. مرحبا بالعالم 🚀 — done."

MODELS = {
    "echo": {"provider": "echo"},
    "slow": {"provider": "echo", "token_delay_ms": 15, "split": "token"},
    "long": {"provider": "echo", "repeat": True, "split": "token", "response": LONG_TEXT},
    "longword": {"provider": "echo", "repeat": True, "response": LONG_TEXT},
    "parrot": {"provider": "echo", "response": "You said: {prompt}"},
    "filler": {"provider": "echo", "repeat": True, "split": "token"},
}

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("openai"), workers=2, config={"models": MODELS}).start()
    yield s
    try:
        assert s.stop() == 0, s.log()
    finally:
        s.kill()


@pytest.fixture(scope="module")
def client(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


def aclient(srv) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                              timeout=30)


def check_chunks(chunks: list, finish: str = "stop") -> str:
    """Check the shape of a streamed completion; return its text."""
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks, chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content_chunks[1:])
    assert content_chunks[-1].choices[0].finish_reason == finish
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    return "".join(c.choices[0].delta.content or "" for c in content_chunks)


# ------------------------------------------------------------ sync SDK
def test_sync_non_stream(client):
    r = client.chat.completions.create(model="echo", messages=HELLO)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "echo" and len(r.choices) == 1
    ch = r.choices[0]
    assert ch.index == 0 and ch.message.role == "assistant"
    assert ch.message.content == "Hello, AI world!"
    assert ch.finish_reason == "stop"
    assert r.usage.prompt_tokens == tokenizer.count_messages(HELLO)
    assert r.usage.completion_tokens == tokenizer.count("Hello, AI world!") == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_sync_stream(client):
    chunks = list(client.chat.completions.create(model="echo", messages=HELLO, stream=True))
    assert check_chunks(chunks) == "Hello, AI world!"
    assert all(c.choices for c in chunks)  # no usage chunk unless asked for
    assert all(c.usage is None for c in chunks)


def test_sync_stream_include_usage(client):
    full = client.chat.completions.create(model="echo", messages=HELLO)
    chunks = list(client.chat.completions.create(
        model="echo", messages=HELLO, stream=True, stream_options={"include_usage": True}))
    assert check_chunks(chunks[:-1]) == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)


@pytest.mark.parametrize("kwargs,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": HELLO, "n": 2}, "n"),
    ({"messages": HELLO, "temperature": 3.5}, "temperature"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_input_is_bad_request(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo", **kwargs)
    assert e.value.status_code == 400
    assert e.value.param == param
    assert e.value.type == "invalid_request_error"


def test_invalid_json_and_missing_model(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{nope", timeout=10)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(srv.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_max_tokens_is_honoured(client):
    for key in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model="echo", messages=HELLO, **{key: 3})
        assert r.choices[0].message.content == "Hello, AI"
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(model="echo", messages=HELLO, max_tokens=3,
                                                 stream=True))
    assert check_chunks(chunks, finish="length") == "Hello, AI"


def test_long_answers_have_max_tokens(client):
    r = client.chat.completions.create(model="filler", messages=HELLO, max_tokens=1001)
    assert r.usage.completion_tokens == 1001 == tokenizer.count(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("Hello, AI world! Hello, AI world! Hello")
    # a limit that falls inside a character made of several tokens stops before it
    for limit in range(250, 262):
        r = client.chat.completions.create(model="long", messages=HELLO, max_tokens=limit)
        text = r.choices[0].message.content
        assert limit - 4 <= r.usage.completion_tokens == tokenizer.count(text) <= limit
        assert r.choices[0].finish_reason == "length"
        assert text.startswith(LONG_TEXT + " " + LONG_TEXT[:10])
    r = client.chat.completions.create(model="echo", messages=HELLO, max_tokens=5)
    assert r.choices[0].finish_reason == "stop"  # the whole answer fitted


def test_stop_sequences(client):
    r = client.chat.completions.create(model="echo", messages=HELLO, stop=[" world", "zzz"])
    assert r.choices[0].message.content == "Hello, AI"
    assert r.choices[0].finish_reason == "stop"
    # a stop sequence spanning several streamed tokens never leaks a part of itself
    chunks = list(client.chat.completions.create(model="long", messages=HELLO, max_tokens=200,
                                                 stop="never leak", stream=True))
    assert check_chunks(chunks) == LONG_TEXT[:LONG_TEXT.index("never leak")]


@pytest.mark.parametrize("model,extra", [
    ("echo", {}), ("slow", {"max_tokens": 12}), ("long", {"max_tokens": 300}),
    ("longword", {"max_tokens": 300}), ("long", {"max_tokens": 300, "stop": "🚀"}),
    ("parrot", {}), ("filler", {"max_tokens": 500}),
])
def test_streamed_text_equals_non_stream_text(client, model, extra):
    msgs = [{"role": "user", "content": "naïve café, 東京 and 🚀 emoji"}]
    full = client.chat.completions.create(model=model, messages=msgs, **extra)
    chunks = list(client.chat.completions.create(
        model=model, messages=msgs, stream=True, stream_options={"include_usage": True}, **extra))
    text = check_chunks(chunks[:-1], finish=full.choices[0].finish_reason)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert full.usage.completion_tokens == tokenizer.count(text)


def test_models_list_and_retrieve(client):
    page = client.models.list()
    assert [m.id for m in page.data] == list(MODELS)
    assert all(m.object == "model" and m.owned_by == "neurohttp" for m in page.data)
    m = client.models.retrieve("slow")
    assert m.id == "slow" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_usage_equals_stats_tokens(srv, client):
    """The numbers in `usage` are the numbers added to /stats, streams included."""
    for stream in (False, True):
        before = srv.stats()
        if stream:
            chunks = list(client.chat.completions.create(
                model="long", messages=HELLO, max_tokens=77, stream=True,
                stream_options={"include_usage": True}))
            usage = chunks[-1].usage
        else:
            usage = client.chat.completions.create(model="long", messages=HELLO,
                                                   max_tokens=77).usage
        after = srv.stats()
        assert after["tokens_in"] - before["tokens_in"] == usage.prompt_tokens
        assert after["tokens_out"] - before["tokens_out"] == usage.completion_tokens == 77


# ------------------------------------------------------------ async SDK
def test_async_sdk(srv):
    async def main() -> None:
        async with aclient(srv) as c:
            full = await c.chat.completions.create(model="echo", messages=HELLO)
            assert full.choices[0].message.content == "Hello, AI world!"
            stream = await c.chat.completions.create(model="slow", messages=HELLO, stream=True)
            chunks = [ch async for ch in stream]
            assert check_chunks(chunks) == "Hello, AI world!"
            stream = await c.chat.completions.create(
                model="echo", messages=HELLO, stream=True,
                stream_options={"include_usage": True})
            chunks = [ch async for ch in stream]
            assert check_chunks(chunks[:-1]) == "Hello, AI world!"
            assert chunks[-1].choices == []
            assert chunks[-1].usage.model_dump() == full.usage.model_dump()
            with pytest.raises(openai.NotFoundError):
                await c.chat.completions.create(model="nope", messages=HELLO)
            with pytest.raises(openai.BadRequestError):
                await c.chat.completions.create(model="echo", messages=HELLO, n=3)

    asyncio.run(main())


def test_async_concurrent_streams(srv):
    """Twenty paced streams at once, over both workers, each complete and in order."""
    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        stream = await c.chat.completions.create(
            model="parrot", messages=[{"role": "user", "content": f"number {i}"}], stream=True)
        return check_chunks([ch async for ch in stream])

    async def main() -> list[str]:
        async with aclient(srv) as c:
            return await asyncio.gather(*(one(c, i) for i in range(20)))

    assert asyncio.run(main()) == [f"You said: number {i}" for i in range(20)]


# ------------------------------------------------------------ the seed API on the same pipeline
def test_seed_chat_stream_equals_non_stream(srv):
    body = {"prompt": "Hi", "model": "long", "max_tokens": 150, "stop": "🚀"}
    full = httpx.post(srv.url + "/v1/chat", json=body, timeout=10).json()
    r = httpx.post(srv.url + "/v1/chat", json=body | {"stream": True}, timeout=10)
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert "".join(x["token"] for x in lines[:-1]) == full["response"]
    assert full["response"] == LONG_TEXT.split("🚀")[0]
    assert lines[-1]["done"] is True and lines[-1]["usage"] == full["usage"]
    assert lines[-1]["finish_reason"] == "stop"
