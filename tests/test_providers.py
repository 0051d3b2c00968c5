"""The provider contract (neurohttp.ai.providers) against a real server: a
plugin provider yields each kind of event (text, str subclasses, Delta with
tool calls, refusals and logprobs, whole OpenAI chunks, Finish, Usage,
ProviderError, bad items), and every API shows it: /v1/chat/completions with
the openai SDK (stream and not), /v1/chat (whole, NDJSON) and /v1/ws."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server import Server, wait_for
from streamtools import RawStream, data_events
from websockets.sync.client import connect

from neurohttp.ai import tokenizer

KINDS_PLUGIN = r'''
import asyncio
import json

from neurohttp.ai.providers import (Chunk, Delta, Finish, ProviderError, Text, ToolCallDelta,
                                    Usage)


class Shout(str):
    """A str subclass: text all the same."""


class Items:
    """An async iterator that is not an async generator."""

    def __init__(self, items):
        self.items = list(items)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self.items.pop(0)


LOGPROB = {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": []}


def upstream_chunk(delta, finish=None, **top):
    return Chunk({"id": "upstream-id", "object": "chat.completion.chunk", "created": 1,
                  "model": "upstream-private-name", "system_fingerprint": "fp_up", **top,
                  "choices": [{"index": 0, "delta": delta, "logprobs": None,
                               "finish_reason": finish}]})


def kinds(prompt, params):
    """What the provider yields for each prompt."""
    if prompt == "tools":
        return [Delta(tool_calls=[ToolCallDelta(0, id="call_1", name="get_weather",
                                                arguments="")]),
                Delta(tool_calls=[ToolCallDelta(0, arguments='{"city": ')]),
                Delta(tool_calls=[ToolCallDelta(0, arguments='"Paris"}')]),
                Delta(tool_calls=[ToolCallDelta(1, id="call_2", name="get_time",
                                                arguments="{}")]),
                Finish("tool_calls")]
    if prompt == "refusal":
        return [Delta(refusal="I can't"), Delta(refusal=" help with that."), Finish("stop")]
    if prompt == "logprobs":
        return [Delta(content="Hi", logprobs={"content": [LOGPROB]}),
                Delta(content=" there", logprobs={"content": [dict(LOGPROB, token=" there")]})]
    if prompt == "chunks":
        return [upstream_chunk({"role": "assistant", "content": ""}),
                upstream_chunk({"content": "Bonjour"}),
                upstream_chunk({"reasoning_content": "thinking it over"}),
                upstream_chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                "function": {"name": "f", "arguments": "{}"}}]}),
                upstream_chunk({}, "stop"),
                Chunk({"id": "upstream-id", "object": "chat.completion.chunk", "created": 1,
                       "model": "upstream-private-name", "choices": [],
                       "usage": {"prompt_tokens": 42, "completion_tokens": 99,
                                 "total_tokens": 141}})]
    if prompt == "usage":
        return ["Hello", " world", Usage(prompt_tokens=50, completion_tokens=30)]
    if prompt == "subclass":
        return [Shout("Loud"), Shout(" noise")]
    if prompt == "counted":  # text the provider counted: 3 + 4 tokens (cl100k says 5)
        return [Text("Counted", 3), Text(" by the provider", 4)]
    if prompt == "badtext":
        return [Text(b"not str")]
    if prompt == "bytes":
        return ["ok", b"raw bytes"]
    if prompt == "none":
        return [None]
    if prompt == "dict":
        return [{"content": "x"}]
    if prompt == "params":
        return [json.dumps(params, sort_keys=True)]
    if prompt == "many":  # ignores max_tokens; two pieces of many tokens each
        return ["one two three four five six", " seven eight nine ten eleven twelve"]
    if prompt == "midfail":
        return ["partial", " answer", ProviderError("upstream_error", "the upstream broke",
                                                    status=500)]
    if prompt.startswith("fail:"):  # fail:KIND[:STATUS[:RETRY]]
        _, kind, *rest = prompt.split(":")
        raise ProviderError(kind, "upstream says no", status=int(rest[0]) if rest else None,
                            retry_after=float(rest[1]) if len(rest) > 1 else None)
    if prompt == "timeout":
        raise TimeoutError("no first byte")
    if prompt == "refused":
        raise ConnectionRefusedError(111, "Connection refused")
    return ["unknown prompt"]


class KindsProvider:
    def __init__(self, options):
        self.options = options

    def stream(self, messages, params):
        prompt = messages[-1]["content"]
        if prompt == "aiter":
            return Items(["one", " two", Finish("stop")])
        if prompt == "notiter":
            return ["a list is not an async iterator"]
        return self._gen(prompt, params)

    async def _gen(self, prompt, params):
        for item in kinds(prompt, params):
            await asyncio.sleep(0)
            if isinstance(item, ProviderError):
                raise item
            yield item


def setup(app, options):
    app.add_provider("kinds", KindsProvider)
'''

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("providers")
    (tmp / "plugins").mkdir()
    (tmp / "plugins" / "kinds.py").write_text(KINDS_PLUGIN)
    s = Server(tmp / "srv", workers=1, config={
        "plugins": {"paths": [str(tmp / "plugins")], "enabled": ["kinds"]},
        "models": {"echo": {"provider": "echo"}, "k": {"provider": "kinds"}}}).start()
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


def ask(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def seed(srv, prompt: str, **kw) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat", json={"prompt": prompt, "model": "k", **kw},
                      timeout=15)


def seed_lines(srv, prompt: str, **kw) -> list[dict]:
    r = seed(srv, prompt, stream=True, **kw)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    return [json.loads(x) for x in r.text.splitlines()]


def ws_answer(srv, prompt: str, **kw) -> list[dict]:
    with connect(f"ws://{srv.host}:{srv.port}/v1/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"prompt": prompt, "model": "k", **kw}))
        out = []
        while True:
            m = json.loads(ws.recv(timeout=15))
            out.append(m)
            if "done" in m or "error" in m:
                return out


# ------------------------------------------------------------ tool calls
def test_tool_calls_round_trip(srv, client):
    r = client.chat.completions.create(model="k", messages=ask("tools"), tools=[{
        "type": "function", "function": {"name": "get_weather", "parameters": {}}}])
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    calls = ch.message.tool_calls
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("call_1", "function", "get_weather", '{"city": "Paris"}'),
        ("call_2", "function", "get_time", "{}")]
    assert r.usage.completion_tokens == sum(tokenizer.count(t) for t in (
        "get_weather", '{"city": ', '"Paris"}', "get_time", "{}"))

    chunks = list(client.chat.completions.create(model="k", messages=ask("tools"), stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.id, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "call_1", "get_weather", ""), (0, None, None, '{"city": '),
        (0, None, None, '"Paris"}'), (1, "call_2", "get_time", "{}")]
    assert deltas[0].type == "function" and deltas[1].type is None
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    whole = seed(srv, "tools").json()  # the seed API: OpenAI's message.tool_calls shape
    assert whole["response"] == "" and [c["function"]["arguments"] for c in
                                        whole["tool_calls"]] == ['{"city": "Paris"}', "{}"]
    lines = seed_lines(srv, "tools")
    assert [line["tool_calls"][0]["index"] for line in lines[:-1]] == [0, 0, 0, 1]
    assert lines[-1]["done"] and lines[-1]["finish_reason"] == "tool_calls"
    msgs = ws_answer(srv, "tools")
    assert msgs[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert msgs[-1]["finish_reason"] == "tool_calls"
    assert msgs[-1]["usage"] == lines[-1]["usage"] == {
        "prompt_tokens": tokenizer.count("tools"),
        "completion_tokens": r.usage.completion_tokens,
        "total_tokens": tokenizer.count("tools") + r.usage.completion_tokens}


# ------------------------------------------------------------ refusals, logprobs
def test_refusals_and_logprobs_reach_the_client(srv, client):
    r = client.chat.completions.create(model="k", messages=ask("refusal"))
    assert r.choices[0].message.refusal == "I can't help with that."
    assert r.choices[0].message.content == ""
    chunks = list(client.chat.completions.create(model="k", messages=ask("refusal"),
                                                 stream=True))
    assert [c.choices[0].delta.refusal for c in chunks[1:-1]] == ["I can't", " help with that."]

    r = client.chat.completions.create(model="k", messages=ask("logprobs"), logprobs=True)
    assert r.choices[0].message.content == "Hi there"
    assert [t.token for t in r.choices[0].logprobs.content] == ["Hi", " there"]
    chunks = list(client.chat.completions.create(model="k", messages=ask("logprobs"),
                                                 stream=True, logprobs=True))
    lp = [c.choices[0].logprobs for c in chunks[1:-1]]
    assert [x.content[0].token for x in lp] == ["Hi", " there"]
    assert lp[0].content[0].logprob == -0.25
    assert seed(srv, "refusal").json()["refusal"] == "I can't help with that."
    assert [m.get("refusal") for m in ws_answer(srv, "refusal")[:-1]] == [
        "I can't", " help with that."]


# ------------------------------------------------------------ whole upstream chunks
def test_whole_upstream_chunks_are_forwarded_with_the_public_name(srv, client):
    st = RawStream(srv.host, srv.port, "/v1/chat/completions",
                   {"model": "k", "messages": ask("chunks"), "stream": True,
                    "stream_options": {"include_usage": True}})
    try:
        events = data_events(list(st.events()))
    finally:
        st.close()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"k"}  # the public name, never the upstream's
    assert "upstream-private-name" not in json.dumps(events)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[1] == {"content": "Bonjour"}
    assert deltas[2] == {"reasoning_content": "thinking it over"}  # unknown fields kept
    assert deltas[3]["tool_calls"][0]["id"] == "call_9"
    assert chunks[1]["system_fingerprint"] == "fp_up"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 42, "completion_tokens": 99, "total_tokens": 141}

    r = client.chat.completions.create(model="k", messages=ask("chunks"))
    assert r.model == "k" and r.choices[0].message.content == "Bonjour"
    assert r.choices[0].message.tool_calls[0].id == "call_9"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (42, 99)


def test_upstream_usage_becomes_the_usage_and_the_stats(srv, client):
    """A provider's Usage is the generation's figures, in `usage` and in /stats
    (prompt 50, completion 30: more than cl100k counts of "usage", "Hello world")."""
    for stream in (False, True):
        before = srv.stats()
        if stream:
            chunks = list(client.chat.completions.create(
                model="k", messages=ask("usage"), stream=True,
                stream_options={"include_usage": True}))
            u = chunks[-1].usage
            assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Hello world"
        else:
            u = client.chat.completions.create(model="k", messages=ask("usage")).usage
        assert (u.prompt_tokens, u.completion_tokens) == (50, 30)
        after = srv.stats()
        assert after["tokens_in"] - before["tokens_in"] == 50
        assert after["tokens_out"] - before["tokens_out"] == 30
        m0, m1 = before["models"].get("k", {}), after["models"]["k"]
        assert m1["tokens_out"] - m0.get("tokens_out", 0) == 30
        assert m1["requests"] - m0.get("requests", 0) == 1


# ------------------------------------------------------------ text, loosely typed
def test_str_subclasses_and_async_iterators_are_text(srv, client):
    r = client.chat.completions.create(model="k", messages=ask("subclass"))
    assert r.choices[0].message.content == "Loud noise"
    assert seed(srv, "aiter").json()["response"] == "one two"
    lines = seed_lines(srv, "aiter")
    assert [x.get("token") for x in lines[:-1]] == ["one", " two"]
    assert lines[-1]["finish_reason"] == "stop"
    assert [m.get("token") for m in ws_answer(srv, "subclass")[:-1]] == ["Loud", " noise"]


def test_text_a_provider_counted_is_sent_and_charged_as_counted(srv, client):
    """Text(text, tokens): the text, whole, streamed and on the WebSocket chat,
    with the provider's counts as the completion tokens (7: cl100k would say
    5); a Text that is not text stops the request
    naming the provider."""
    r = client.chat.completions.create(model="k", messages=ask("counted"))
    assert r.choices[0].message.content == "Counted by the provider"
    assert r.usage.completion_tokens == 3 + 4
    chunks = list(client.chat.completions.create(
        model="k", messages=ask("counted"), stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Counted by the provider"
    assert chunks[-1].usage.completion_tokens == 7
    assert [m.get("token") for m in ws_answer(srv, "counted")[:-1]] == \
        ["Counted", " by the provider"]
    r = seed(srv, "badtext")
    assert r.status_code == 500 and "provider 'kinds'" in r.json()["error"]["message"]
    assert "Text" in r.json()["error"]["message"]


@pytest.mark.parametrize("prompt,what", [("bytes", "bytes"), ("none", "NoneType"),
                                         ("dict", "dict"), ("notiter", "list")])
def test_bad_yields_stop_the_request_naming_the_provider(srv, client, prompt, what):
    pid = srv.worker_pids()
    r = seed(srv, prompt)
    assert r.status_code == 500
    err = r.json()["error"]
    assert "provider 'kinds' of plugin 'kinds'" in err["message"] and what in err["message"]
    assert err["code"] == "provider_error"
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="k", messages=ask(prompt))
    assert "provider 'kinds'" in str(e.value)
    # streamed: before any output the failure keeps its status; after some, an error event
    st = RawStream(srv.host, srv.port, "/v1/chat/completions",
                   {"model": "k", "messages": ask(prompt), "stream": True})
    try:
        status, _ = st.read_head()
        if prompt == "bytes":
            assert status == 200
            events = data_events(list(st.events()))
            assert events[1]["choices"][0]["delta"] == {"content": "ok"}
            assert "provider 'kinds'" in events[-1]["error"]["message"]
            assert "[DONE]" not in events
        else:
            assert status == 500
    finally:
        st.close()
    msgs = ws_answer(srv, prompt)
    assert "provider 'kinds'" in msgs[-1]["error"]["message"]
    wait_for(lambda: f"provider 'kinds' of plugin 'kinds' yielded {what}" in srv.log()
             or f"of plugin 'kinds': stream() returned {what}" in srv.log(), 10,
             what="the bad output logged, naming the plugin")
    assert srv.worker_pids() == pid and srv.get_json("/health")["status"] == "ok"


# ------------------------------------------------------------ failures
@pytest.mark.parametrize("prompt,status,code", [
    ("fail:rate_limited:429:7", 429, "rate_limited"),
    ("fail:upstream_error:401", 502, "upstream_error"),     # an upstream's 401 is not the client's
    ("fail:upstream_unavailable:503:2", 503, "upstream_unavailable"),
    ("fail:upstream_timeout", 504, "upstream_timeout"),
    ("fail:bad_request:400", 400, "bad_request"),
    ("timeout", 504, "upstream_timeout"),
    ("refused", 502, "upstream_unreachable"),
])
def test_provider_failures_get_the_design_status(srv, prompt, status, code):
    body = {"model": "k", "messages": ask(prompt)}
    for stream in (False, True):  # a stream that fails before its first piece is not a 200
        r = httpx.post(srv.url + "/v1/chat/completions", json=body | {"stream": stream},
                       timeout=15)
        assert r.status_code == status, (stream, r.text)
        err = r.json()["error"]
        assert err["code"] == code and set(err) == {"message", "type", "param", "code"}
        if status in (429, 503):
            assert r.headers["retry-after"] == ("7" if status == 429 else "2")
        else:
            assert "retry-after" not in r.headers
    assert seed(srv, prompt).status_code == status
    assert ws_answer(srv, prompt)[-1]["error"]["code"] == code


def test_a_failure_after_the_first_piece_ends_the_stream_with_an_error(srv, client):
    before = srv.stats()
    st = RawStream(srv.host, srv.port, "/v1/chat/completions",
                   {"model": "k", "messages": ask("midfail"), "stream": True})
    try:
        events = data_events(list(st.events()))
    finally:
        st.close()
    assert st.status == 200
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == \
        "partial answer"
    assert events[-1]["error"]["code"] == "upstream_error"
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="k", messages=ask("midfail"), stream=True))
    after = srv.stats()
    assert after["models"]["k"]["errors"] - before["models"].get("k", {}).get("errors", 0) == 2
    assert after["tokens_out"] - before["tokens_out"] == 2 * tokenizer.count("partial answer")


# ------------------------------------------------------------ request fields
def test_fields_the_server_does_not_act_on_reach_the_provider(srv, client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(
        model="k", messages=ask("params"), tools=tools, tool_choice="auto",
        response_format={"type": "json_object"}, seed=7, logprobs=True, top_logprobs=2,
        user="u-1", n=1, parallel_tool_calls=False, max_completion_tokens=300,
        temperature=0.5, extra_body={"vendor_option": {"x": 1}})
    params = json.loads(r.choices[0].message.content)
    assert params == {"tools": tools, "tool_choice": "auto",
                      "response_format": {"type": "json_object"}, "seed": 7, "logprobs": True,
                      "top_logprobs": 2, "user": "u-1", "n": 1, "parallel_tool_calls": False,
                      "max_tokens": 300, "max_completion_tokens": 300, "temperature": 0.5,
                      "vendor_option": {"x": 1}}
    # the checks on the fields the server acts on stay
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="k", messages=ask("params"), n=2)
    assert json.loads(seed(srv, "params", temperature=0.2, tools=tools).json()["response"]) \
        == {"temperature": 0.2, "tools": tools}


# ------------------------------------------------------------ max_tokens
def test_max_tokens_counts_tokens_not_chunks(srv, client):
    """A provider that ignores max_tokens and yields many tokens per piece is
    cut at max_tokens cl100k tokens, on a token boundary, on every API."""
    r = client.chat.completions.create(model="k", messages=ask("many"), max_tokens=8)
    assert r.choices[0].message.content == "one two three four five six seven eight"
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(
        model="k", messages=ask("many"), max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "one two three"
    assert chunks[-1].usage.completion_tokens == 3
    assert seed(srv, "many", max_tokens=5).json()["usage"]["completion_tokens"] == 5
    lines = seed_lines(srv, "many", max_tokens=5)
    assert "".join(x.get("token", "") for x in lines[:-1]) == "one two three four five"
    done = ws_answer(srv, "many", max_tokens=7)[-1]
    assert done["usage"]["completion_tokens"] == 7 and done["finish_reason"] == "length"
