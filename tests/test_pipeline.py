"""The token pipeline and the echo model, in process (no sockets): stop
sequences, max_tokens, filters, usage counting, and closing the provider."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from neurohttp import config
from neurohttp.ai import tokenizer
from neurohttp.ai.pipeline import (
    MAX_STOP_CHARS,
    SETTLE_PARTS,
    Generation,
    StopCutter,
    parse_stop,
)
from neurohttp.ai.providers import LENGTH, STOP
from neurohttp.ai.providers.echo import EchoProvider
from neurohttp.context import Counters, UsageSink
from neurohttp.errors import BadInput
from neurohttp.stats import layout as L


def cut_all(stops: list[str], toks: list[str]) -> tuple[list[str], bool]:
    c = StopCutter(stops)
    out = []
    for t in toks:
        s, stop = c.feed(t)
        if s:
            out.append(s)
        if stop:
            return out, True
    rest = c.flush()
    return out + ([rest] if rest else []), False


@pytest.mark.parametrize("stops,toks,text,stopped", [
    (["world"], ["Hello", ",", " wor", "ld", "!"], "Hello, ", True),
    (["world"], ["Hello", ",", " wor", "k", "!"], "Hello, work!", False),
    (["\n\n"], ["a\n", "\nb"], "a", True),
    (["b", "ab"], ["xa", "b"], "x", True),       # both end on one character: the longer wins
    (["abc"], ["ab", "ab", "abc"], "abab", True),
    (["zz"], ["z", "y", "z"], "zyz", False),       # held text comes back when it is not a stop
    (["ab", "abc"], ["x", "a", "bc"], "x", True),  # a stop that begins another ends first
    (["abc", "ab"], ["xab", "c"], "x", True),
    (["abc", "b"], ["xa", "bc"], "xa", True),      # "b" is complete before "abc" could be
    (["abcd", "bc"], ["xabcd"], "xa", True),       # the same wherever the tokens are cut
    (["abcd", "bc"], ["xab", "cd"], "xa", True),
    (["aab"], ["a", "a", "a", "a", "b", "!"], "aa", True),  # a stop that overlaps itself
    (["\n\n", "User:", "###"], ["Hi", "\n", "Us", "er", ":"], "Hi\n", True),
])
def test_stop_cutter(stops, toks, text, stopped):
    out, hit = cut_all(stops, toks)
    assert "".join(out) == text and hit is stopped
    for piece in out:  # nothing after a stop's start is ever sent
        assert not any(s in piece for s in stops)


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Where the first stop sequence completes (ties: the longer one), by brute force."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < (best[0], -best[1])):
            best = (i + len(s), len(s))
    return (text[:best[0] - best[1]], True) if best else (text, False)


def test_stop_cutter_matches_the_reference_however_the_text_is_cut():
    rnd = random.Random(7)
    for _ in range(5000):
        alpha = rnd.choice(["ab", "abc", "a b\n"])
        text = "".join(rnd.choice(alpha) for _ in range(rnd.randint(0, 40)))
        stops = ["".join(rnd.choice(alpha) for _ in range(rnd.randint(1, 6)))
                 for _ in range(rnd.randint(1, 4))]
        cuts = sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, rnd.randint(0, 12))))
        toks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        c = StopCutter(stops)
        for t in toks:
            if c.feed(t)[1]:
                break
            assert len(c.held) < max(map(len, stops))  # held back: at most a stop's length - 1
        out, hit = cut_all(stops, toks)
        assert ("".join(out), hit) == reference_cut(text, stops), (text, stops, toks)


def test_stop_matching_is_linear():
    """Long tokens against a stop at the length limit that each one's tail could
    begin: the matcher did O(len(stop)**2) work per token (minutes for this)."""
    stop = "b" + "a" * (MAX_STOP_CHARS - 1)
    c = StopCutter([stop, "zz"])
    tok = "a" * 4096
    t0 = time.monotonic()
    for i in range(20_000):  # 80 MB of text
        assert c.feed(tok) == (tok, False)
        if not i % 1000:
            assert time.monotonic() - t0 < 10, f"stuck: {i} tokens in 10 s"
    assert c.feed(" b" + "a" * 5000) == (" ", True)


def test_stop_length_is_capped():
    assert parse_stop(["x" * MAX_STOP_CHARS, "\n"]) == ["x" * MAX_STOP_CHARS, "\n"]
    with pytest.raises(BadInput) as e:
        parse_stop("x" * (MAX_STOP_CHARS + 1))
    assert e.value.param == "stop" and str(MAX_STOP_CHARS) in e.value.message


def test_max_output_tokens_is_a_key_of_every_model_table(tmp_path):
    cfg = config.from_dict({"models": {"m": {"provider": "echo"}}})
    assert cfg.models["m"]["max_output_tokens"] == 4096
    for bad in (0, -1, 10 ** 10, 1.5, True):
        with pytest.raises(config.ConfigError, match=r"models\.m\.max_output_tokens"):
            config.from_dict({"models": {"m": {"provider": "echo", "max_output_tokens": bad}}})
    # a provider a plugin adds: its table is the plugin's, but this key is checked too
    plugin = {"plugins": {"enabled": ["x"]}, "models": {"p": {"provider": "x"}}}
    assert config.from_dict(plugin).models["p"] == {"provider": "x"}
    plugin["models"]["p"]["max_output_tokens"] = 0
    with pytest.raises(config.ConfigError, match=r"models\.p\.max_output_tokens"):
        config.from_dict(plugin)


def test_echo_answers():
    e = EchoProvider({})
    assert e.tokens([], {}) == ["Hello,", " AI", " world!", STOP]
    assert e.tokens([], {"max_tokens": 5})[-1] is STOP      # it fits: a natural stop
    assert e.tokens([], {"max_tokens": 4}) == ["Hello,", " AI", " world", LENGTH]
    t = EchoProvider({"split": "token"}).tokens([], {})
    assert t == ["Hello", ",", " AI", " world", "!", STOP]
    r = EchoProvider({"repeat": True, "split": "token"})
    toks = r.tokens([], {"max_tokens": 1000})
    assert toks[-1] is LENGTH and len(toks) == 1001
    assert tokenizer.count("".join(toks[:-1])) == 1000
    assert EchoProvider({"repeat": True}).tokens([], {})[-1] is STOP  # no limit: once
    p = EchoProvider({"response": "<{prompt}>"})
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]}]
    assert "".join(p.tokens(msgs, {})[:-1]) == "<two>"


class FakeSlot(dict):
    def __missing__(self, k: int) -> int:
        return 0


class Upstream:
    """A provider that records whether its generator was closed."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.sent = 0
        self.closed = False

    async def stream(self, messages, params):
        try:
            while True:
                await asyncio.sleep(self.delay)
                self.sent += 1
                yield f" t{self.sent}"
        finally:
            self.closed = True


class Texts:
    """A framer for in-process tests: each piece's frame is its text as JSON
    (see `texts`), a Delta's is b"delta", a failure's b"error". streaming=False
    keeps the text, as a whole answer does."""

    batch = 1
    pre = b""
    post = b""

    def __init__(self, streaming: bool = True) -> None:
        self.streaming = streaming

    def start(self, gen):
        return None

    def delta(self, gen, d):
        return b"delta"

    def end(self, gen):
        return None

    def error(self, gen, failure):
        return b"error"


class Framed:
    """A bytes framer like the HTTP ones: `pre` + JSON string + `post`, 64 to a chunk."""

    batch = 64
    streaming = True

    def __init__(self, pre: bytes, post: bytes) -> None:
        self.pre, self.post = pre, post

    def start(self, gen):
        return None

    def delta(self, gen, d):
        return None

    def end(self, gen):
        return None

    def error(self, gen, failure):
        return None


def gen_for(provider, params=None, filters=None) -> Generation:
    sink = UsageSink(Counters(FakeSlot(), None))
    return Generation(sink, None, "m", provider, [], params or {}, 3, filters or [])


def slot_of(g: Generation):
    return g.usage_sink.counters.slot


async def texts(g: Generation, streaming: bool = True) -> list[str]:
    return [json.loads(t) async for t in g.frames(Texts(streaming))]


def test_cancelling_a_stream_closes_the_provider():
    up = Upstream()

    async def main() -> None:
        g = gen_for(up)

        async def consume() -> None:
            async for _ in g.frames(Texts(streaming=False)):
                pass

        task = asyncio.ensure_future(consume())
        while up.sent < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        g.close(True)
        assert up.closed
        assert slot_of(g)[L.S_TOKENS_OUT] == tokenizer.count(g.text) > 0

    asyncio.run(main())


def test_closing_the_token_iterator_closes_the_provider():
    up = Upstream(0)

    async def main() -> None:
        g = gen_for(up)
        it = g.frames(Texts())
        assert await it.__anext__() == b'" t1"'
        await it.aclose()
        assert up.closed

    asyncio.run(main())


def test_max_tokens_guard_stops_a_provider_that_ignores_it():
    """max_tokens counts tokens, not the provider's pieces: " t1" is two."""
    up = Upstream(0)

    async def main() -> Generation:
        g = gen_for(up, {"max_tokens": 7})
        assert "".join(await texts(g, streaming=False)) == " t1 t2 t3 t"
        return g

    g = asyncio.run(main())
    assert up.closed and g.finish()["completion_tokens"] == tokenizer.count(g.text) == 7
    assert g.finish_reason == "length"


def test_filters_and_usage_counted_once():
    seen = []

    def upper(req, tok):
        seen.append(tok)
        return None if "world" in tok else tok.upper()

    g = gen_for(EchoProvider({}), filters=[upper])
    assert asyncio.run(texts(g, streaming=False)) == ["HELLO,", " AI"]
    assert g.text == "HELLO, AI" and g.finish_reason == "content_filter"
    u = g.finish()
    g.close()
    assert u == {"prompt_tokens": 3, "completion_tokens": tokenizer.count("HELLO, AI"),
                 "total_tokens": 3 + tokenizer.count("HELLO, AI")}
    assert slot_of(g)[L.S_TOKENS_OUT] == u["completion_tokens"]  # not twice


@pytest.mark.parametrize("params", [
    {}, {"max_tokens": 7}, {"stop": ["world!"]}, {"stop": [" AI world! Hel", "zz"]},
    {"max_tokens": 40, "stop": ["never"]},
])
@pytest.mark.parametrize("split", ["word", "token"])
def test_ready_and_paced_paths_agree(params, split):
    """An unpaced model answers through the ready (batched) path, a paced one
    through the async path: same pieces, same text, same finish_reason."""
    opts = {"repeat": True, "split": split}

    def lower(req, tok):
        return tok.lower()

    instant = gen_for(EchoProvider(opts), dict(params), [lower])
    assert instant.run_now()
    paced = gen_for(EchoProvider(opts | {"token_delay_ms": 0.01}), dict(params), [lower])
    assert not paced.ready()

    assert "".join(asyncio.run(texts(paced))) == instant.text
    assert paced.finish() == instant.finish()
    assert paced.finish_reason == instant.finish_reason
    for stop in params.get("stop", []):
        assert stop.lower() not in instant.text  # (the filter lowers the sent text)


def test_frames_batches_ready_tokens():
    echo = EchoProvider({"repeat": True, "split": "token"})
    g = gen_for(echo, {"max_tokens": 200})

    async def main() -> list[bytes]:
        return [c async for c in g.frames(Framed(b"<", b">"))]

    chunks = asyncio.run(main())
    assert len(chunks) == 4  # 64 + 64 + 64 + 8 tokens
    toks = echo.tokens([], {"max_tokens": 200})[:-1]
    assert b"".join(chunks) == b"".join(b"<" + json.dumps(t).encode() + b">" for t in toks)


@pytest.mark.parametrize("ready", [True, False])
def test_long_streams_count_in_slices_exactly(ready):
    """A stream drops its sent text as it goes; the count stays exact."""
    text = ("Streaming is the product — مرحبا بالعالم 你好，世界。 naïve café 12345 "
            "don't   stop\n\n🚀 ") * 40
    pieces = tokenizer.split(text)

    class Source:
        def tokens_now(self, messages, params):
            return iter(pieces * 10) if ready else None

        async def stream(self, messages, params):
            for p in pieces * 10:
                yield p

    g = gen_for(Source())

    async def main() -> int:
        n = 0
        async for chunk in g.frames(Framed(b"", b"")):
            n += len(chunk)
        return n

    assert asyncio.run(main()) > 0
    assert len(g.parts) < 1000  # it did not keep every piece
    assert g.tokens_before > 0
    assert g.finish()["completion_tokens"] == tokenizer.count(text * 10)
    assert slot_of(g)[L.S_TOKENS_OUT] == tokenizer.count(text * 10)


class Failing:
    """An upstream that answers two tokens, then fails the way an HTTP upstream does."""

    def __init__(self, status: int | None, retry_after: int | None = None) -> None:
        self.status = status
        self.retry_after = retry_after

    async def stream(self, messages, params):
        yield "partial"
        yield " answer"
        e = RuntimeError("upstream says no")
        if self.status is not None:
            e.status = self.status
            e.retry_after = self.retry_after
        raise e


def services_for(provider, filters=None):
    """Services for in-process handlers: a fake slot, one model "m"."""
    from neurohttp.context import Services, Settings

    class Models:
        max_output_tokens = {"m": 4096}

        def get(self, name):
            return "m", provider

        def names(self):
            return ["m"]

        def provider_name(self, model):
            return "fake"

    class Clock:
        second = 1_700_000_000

    counters = Counters(FakeSlot(), None)
    return Services(Settings(sse_ping_s=0.0), Models(), counters, None, None, Clock(),
                    UsageSink(counters), filters or [])


def openai_handlers(provider):
    from neurohttp.ai.pipeline import Pipeline
    from neurohttp.handlers.openai import OpenAIHandlers
    return OpenAIHandlers(Pipeline(services_for(provider)), 0)


@pytest.mark.parametrize("status,retry,expect", [
    (429, 7, 429), (503, None, 503), (None, None, 500), (99, None, 500)])
def test_provider_failures_keep_openai_shapes(status, retry, expect):
    from neurohttp.messages import Request, StreamingResponse
    h = openai_handlers(Failing(status, retry))

    def req(stream: bool) -> Request:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                           "stream": stream}).encode()
        return Request("POST", b"/v1/chat/completions", "1.1", [], "127.0.0.1", True, body)

    resp = asyncio.run(h.completions(req(False)))
    assert resp.status == expect
    err = json.loads(resp.body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (resp.headers.get("Retry-After") == str(retry)) if retry else not resp.headers

    async def read() -> list[bytes]:
        stream = await h.completions(req(True))  # primed: a stream once a piece came
        assert isinstance(stream, StreamingResponse)
        return [c async for c in stream.chunks]

    events = b"".join(asyncio.run(read())).split(b"\n\n")
    last = json.loads(events[-2][len(b"data: "):])
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert b"[DONE]" not in events[-2]
    texts = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert "".join(texts) == "partial answer"


def test_long_non_stream_answers_are_made_in_slices():
    """A long answer from a model that has it at once (unpaced echo): not made in
    one go but READY_RUN tokens per turn of the loop, its text joined and counted
    as it grows (never a list of every piece), and counted exactly."""
    echo = EchoProvider({"repeat": True})
    assert echo.complete_now([], {"max_tokens": 4096}) is not None
    assert echo.complete_now([], {"max_tokens": 4097}) is None  # left to the token path
    parrot = EchoProvider({"response": "{prompt}"})
    assert parrot.complete_now([{"role": "user", "content": "x" * 16384}], {}) == "x" * 16384
    assert parrot.complete_now([{"role": "user", "content": "x" * 16385}], {}) is None

    g = gen_for(echo, {"max_tokens": 300_000})
    longest = [0]

    async def main() -> int:
        turns = 0
        done = False

        async def watch() -> None:
            nonlocal turns
            while not done:
                turns += 1
                longest[0] = max(longest[0], len(g.parts))
                await asyncio.sleep(0)

        task = asyncio.ensure_future(watch())
        assert not g.run_now()  # more than READY_RUN tokens: the rest is left for the loop
        assert await g.run_to_end() is None
        done = True
        await task
        return turns

    assert asyncio.run(main()) > 100
    assert longest[0] <= SETTLE_PARTS + 1
    u = g.finish()
    assert u["completion_tokens"] == 300_000 == tokenizer.count(g.text)
    assert g.finish_reason == "length" and g.text.startswith("Hello, AI world! Hello")
    assert len(g.kept) < 300_000 // SETTLE_PARTS + 2


def test_long_parrot_answers_are_cut_lazily():
    """A parrot of a long prompt is cut into pieces as they are sent: words are
    at most WORD_MAX characters, tokens come slice by slice."""
    from neurohttp.ai.providers.echo import WORD_MAX
    prompt = "a" * 100_000 + " b  c" + " " * 300
    for split in ("word", "token"):
        p = EchoProvider({"response": "<{prompt}>", "split": split})
        it = p.tokens_now([{"role": "user", "content": prompt}], {})
        first = next(it)
        assert len(first) <= WORD_MAX
        rest = list(it)
        assert first + "".join(rest[:-1]) == "<" + prompt + ">" and rest[-1] is STOP
        assert max(map(len, rest[:-1])) <= max(WORD_MAX, 300)
