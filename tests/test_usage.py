"""One usage event per generation (context.UsageSink): completion tokens
charged as they stream, every ending counted once (finished, cut by
max_tokens, cancelled, failed), the event on the request for the access log
and the plugins whatever is configured."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import pytest
from server import wait_for
from streamtools import RawStream
from test_pipeline import FakeSlot, Texts, Upstream

from neurohttp.ai import tokenizer
from neurohttp.ai.pipeline import Generation
from neurohttp.ai.providers import ProviderError
from neurohttp.ai.providers.echo import EchoProvider
from neurohttp.context import (
    CANCELLED,
    FAILED,
    FINISHED,
    LENGTH,
    Counters,
    UsageEvent,
    UsageSink,
    usage_event,
)
from neurohttp.stats import layout as L

CHAT = "/v1/chat/completions"


# ------------------------------------------------------------ in process
def test_usage_event_made_cheaply_is_the_same_frozen_event():
    """usage_event() (the pipeline's) gives what UsageEvent() gives: a frozen
    dataclass instance with every field, compared by identity."""
    import dataclasses
    args = ("m", "k", 3, 4, 0.5, 0.25, FINISHED, "stop", None, True, False)
    ev, ref = usage_event(*args), UsageEvent(*args)
    assert type(ev) is UsageEvent and dataclasses.is_dataclass(ev)
    assert dataclasses.astuple(ev) == dataclasses.astuple(ref) and ev.total_tokens == 7
    assert ev != ref and ev == ev and hash(ev) != hash(ref)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.model = "x"  # type: ignore[misc]
    assert dataclasses.replace(ev, model="z").model == "z"
    assert usage_event("m", None, 1, 2, 0.0, None, FAILED).error is None


class Recorder:
    """A usage subscriber that keeps what it is told."""

    def __init__(self) -> None:
        self.charged = [0, 0]
        self.events: list[UsageEvent] = []

    def charge(self, model, key, prompt_tokens, completion_tokens) -> None:
        self.charged[0] += prompt_tokens
        self.charged[1] += completion_tokens

    def report(self, event, request) -> None:
        self.events.append(event)


def generation(provider, params=None) -> tuple[Generation, Recorder]:
    sink = UsageSink(Counters(FakeSlot(), None))
    rec = Recorder()
    sink.subscribe(rec)
    sink.charge("m", None, 3)  # as Pipeline.begin does
    return Generation(sink, None, "m", provider, [], params or {}, 3, []), rec


class Broken:
    async def stream(self, messages, params):
        yield "half"
        yield " done"
        raise ProviderError("upstream_timeout", "idle timeout")


@pytest.mark.parametrize("case", ["finished", "length", "cancelled", "failed"])
def test_every_generation_reports_once_with_what_was_charged(case):
    provider = {"finished": EchoProvider({"token_delay_ms": 1}),
                "length": EchoProvider({"token_delay_ms": 1, "repeat": True}),
                "cancelled": Upstream(0.001), "failed": Broken()}[case]
    g, rec = generation(provider, {"max_tokens": 9} if case == "length" else None)

    async def main() -> None:
        frames = g.frames(Texts(streaming=False))
        n = 0
        async for _ in frames:
            n += 1
            if case == "cancelled" and n == 5:
                break
        await frames.aclose()
        g.close(case == "cancelled")
        g.close(True)  # a second close changes nothing

    asyncio.run(main())
    if case not in ("cancelled", "failed"):
        g.finish()
    assert len(rec.events) == 1
    ev = rec.events[0]
    assert ev.outcome == {"finished": FINISHED, "length": LENGTH, "cancelled": CANCELLED,
                          "failed": FAILED}[case]
    assert ev.model == "m" and ev.key is None and ev.prompt_tokens == 3
    assert ev.completion_tokens == rec.charged[1] == tokenizer.count(g.text) > 0
    assert g.usage_sink.counters.slot[L.S_TOKENS_OUT] == ev.completion_tokens
    assert ev.latency >= ev.ttft > 0
    if case == "length":
        assert ev.completion_tokens == 9 and ev.finish_reason == "length"
    if case == "failed":
        assert ev.error == "upstream_timeout" and g.text == "half done"


def test_completion_tokens_are_charged_as_they_stream():
    """A paced stream's tokens reach the sink while it runs, not in one go at
    its end; the total is exact."""
    g, rec = generation(EchoProvider({"token_delay_ms": 5, "repeat": True, "split": "token"}),
                        {"max_tokens": 200})
    seen = []

    async def main() -> None:
        async for _ in g.frames(Texts()):
            seen.append(rec.charged[1])
        g.finish()

    asyncio.run(main())
    assert len({x for x in seen if 0 < x < 200}) >= 3  # several partial charges
    assert rec.charged[1] == rec.events[0].completion_tokens == 200


# ------------------------------------------------------------ real servers
PACED = {"provider": "echo", "token_delay_ms": 40, "repeat": True, "split": "token",
         "max_output_tokens": 100_000}


def test_tokens_out_follows_a_slow_stream(make_server):
    """/stats tokens_out moves while a paced stream runs, and the per-second
    figures spread its tokens over the seconds it ran (they spiked at its end)."""
    srv = make_server(workers=1, config={"models": {"echo": {"provider": "echo"},
                                                    "paced": PACED}})
    before = srv.stats()["tokens_out"]
    st = RawStream(srv.host, srv.port, CHAT, {"model": "paced", "stream": True,
                                              "max_tokens": 75, "messages": [
                                                  {"role": "user", "content": "x"}]})
    try:
        events = st.events()
        for _ in range(25):  # the role chunk and 24 tokens: ~1 s in
            next(events)
        mid = srv.stats()["tokens_out"] - before
        assert 0 < mid < 75
        rest = list(events)
        assert rest[-1] == "data: [DONE]"
    finally:
        st.close()
    assert srv.stats()["tokens_out"] - before == 75

    def spread() -> list[int] | None:
        time.sleep(0.3)
        series = srv.stats()["window"]["series"]["tokens_out"]  # per second, last minute
        return series if sum(series) == 75 else None
    series = wait_for(spread, 10, interval=0, what="the stream's seconds closed")
    assert len([x for x in series if x]) >= 2 and max(series) < 75


def test_a_cancelled_non_stream_answer_counts_its_tokens(make_server):
    """A client that leaves a paced non-streamed answer: what was produced is
    counted (tokens and one request of the model), not lost."""
    srv = make_server(workers=1, config={"models": {"echo": {"provider": "echo"},
                                                    "paced": PACED}})
    before = srv.stats()
    body = json.dumps({"model": "paced", "max_tokens": 1000,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.6)  # ~15 tokens made
    # a reset, not a FIN: a half-closed client is still answered (ARCHITECTURE.md)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()

    def counted() -> dict | None:
        st = srv.stats()
        return st if st["models"].get("paced", {}).get("requests") else None
    after = wait_for(counted, 10, what="the cancelled answer to be counted")
    made = after["tokens_out"] - before["tokens_out"]
    assert 3 <= made < 1000
    m = after["models"]["paced"]
    assert m["tokens_out"] == made and m["errors"] == 0
    assert after["tokens_in"] - before["tokens_in"] == m["tokens_in"] > 0


USAGE_PLUGIN = '''
def setup(app, options):
    @app.after_response
    def usage_header(request, response):
        u = getattr(request, "usage", None)
        if u is not None:
            response.headers["x-usage"] = f"{u.model} {u.prompt_tokens + u.completion_tokens}"
            response.headers["x-outcome"] = u.outcome
        elif request.state.get("model"):  # where usage was before the usage event
            response.headers["x-usage"] = f"{request.state['model']} {request.state['tokens']}"
'''


@pytest.mark.parametrize("access_log", [False, True])
def test_usage_reaches_the_request_whatever_is_configured(make_server, tmp_path, access_log):
    """The usage event is on the request for the after_response hooks (and the
    access log) whether the access log is on or not."""
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "usage_header.py").write_text(USAGE_PLUGIN)
    config = {"plugins": {"paths": [str(pdir)], "enabled": ["usage_header"]},
              "models": {"echo": {"provider": "echo"},
                         "paced": PACED | {"token_delay_ms": 1}}}
    log = tmp_path / "access.log"
    if access_log:
        config["log"] = {"access_log": str(log)}
    srv = make_server(workers=1, config=config)
    prompt = tokenizer.count_messages([{"role": "user", "content": "Hello"}])
    for path, body, expect, outcome in [
        ("/v1/chat", {"prompt": "Hello"}, "echo 6", "finished"),
        (CHAT, {"model": "echo", "messages": [{"role": "user", "content": "Hello"}]},
         f"echo {prompt + 5}", "finished"),
        ("/v1/chat", {"prompt": "Hello", "model": "paced", "max_tokens": 4}, "paced 5", "length"),
    ]:
        status, headers, _ = srv.request("POST", path, body=json.dumps(body))
        assert status == 200 and headers.get("x-usage") == expect, (path, headers)
        assert headers.get("x-outcome") == outcome
    if access_log:
        def lines() -> list[dict] | None:
            got = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            got = [x for x in got if x["method"] == "POST"]
            return got if len(got) == 3 else None
        got = wait_for(lines, 10, what="three access-log lines")
        assert [(x["model"], x["tokens"]) for x in got] == [("echo", 6), ("echo", 13),
                                                            ("paced", 5)]


def test_an_upstream_count_below_what_was_charged_never_takes_tokens_back():
    """A provider's Usage replaces the server's count, but counters only go up:
    when it is below what was already charged, the charged figure stands."""
    from neurohttp.ai.providers import Usage

    class Low:
        async def stream(self, messages, params):
            for word in ("alpha beta gamma delta " * 400).split(" "):  # > SETTLE_PARTS
                yield word + " "
                await asyncio.sleep(0)
            yield Usage(prompt_tokens=1, completion_tokens=2)

    g, rec = generation(Low())

    async def main() -> None:
        async for _ in g.frames(Texts()):
            pass
        g.finish()

    asyncio.run(main())
    ev = rec.events[0]
    assert ev.completion_tokens == rec.charged[1] > 2
    assert ev.prompt_tokens == 3 == rec.charged[0]  # 1 < the 3 already charged
    assert g.usage_sink.counters.slot[L.S_TOKENS_OUT] == ev.completion_tokens
