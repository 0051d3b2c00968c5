"""The per-second ring (stats/window.py) on a real shared-memory block, with a
clock the test moves: the last minute fills, decays after 60 s, survives a
worker's fold into the retired slot, and since-start figures never go back."""

from __future__ import annotations

import gc
import os
import time
import uuid

import pytest

from neurohttp.stats import layout as L
from neurohttp.stats.block import StatsBlock
from neurohttp.stats.snapshot import Snapshot, stats_document
from neurohttp.stats.window import Meter, percentile

ROUTES = ["other", "/health", "/v1/chat"]
MODELS = ["echo", "llama"]


@pytest.fixture
def block():
    blk = StatsBlock.create(f"neurohttp-test-{uuid.uuid4().hex[:12]}", L.Geometry(max_workers=2))
    yield blk
    gc.collect()  # views of the block held in reference cycles would keep it mapped
    blk.unlink()


def start_worker(block: StatsBlock, slot: int, now: float) -> Meter:
    s = block.slot(slot)
    s[L.S_STATE] = L.STATE_READY
    s[L.S_PID] = os.getpid()
    s[L.S_WORKER_ID] = slot
    s[L.S_STARTED] = int(now) - 1000
    return Meter(s, MODELS, block.geometry, ROUTES, now=now)


def doc(block: StatsBlock, now: float) -> dict:
    return stats_document(Snapshot(block, ROUTES, ["other", *MODELS], now=now), processes=False)


def test_coarse_buckets_are_pairs_of_fine_buckets():
    # the request path finds the coarse bucket with a shift of the fine one
    assert L.N_CBUCKETS == 45
    for fine in range(L.N_BUCKETS):
        c = fine >> 1
        hi_fine = L.BUCKET_BOUNDS_US[fine] if fine < len(L.BUCKET_BOUNDS_US) else None
        hi_coarse = L.CBUCKET_BOUNDS_US[c] if c < len(L.CBUCKET_BOUNDS_US) else None
        if hi_coarse is not None:
            assert hi_fine is not None and hi_fine <= hi_coarse
    geo = L.Geometry()
    assert geo.cell_words * L.RING_CELLS + geo.s_ring <= geo.slot_words
    # Meter.model_request skips the search below the first coarse bound: same bucket
    from bisect import bisect_right
    for us in range(0, 5000):
        coarse = bisect_right(L.BUCKET_BOUNDS_US, us) >> 1
        assert (0 if us < L.CBUCKET_BOUNDS_US[0] else coarse) == coarse


def test_window_fills_then_decays_after_a_minute(block):
    t0 = float(int(time.time()))
    m = start_worker(block, 1, t0)
    # a burst in second t0: 100 fast /health (200 us) and 10 slow /v1/chat (150 ms)
    for _ in range(100):
        m.count_response(1, 200, 200)
    for _ in range(10):
        m.count_response(2, 200, 150_000)
    m.count_response(0, 404, 100)

    d = doc(block, t0 + 0.5)  # second t0 is not over: not in the window yet
    assert d["window"]["requests"] == 0
    assert d["routes"]["/health"]["requests"] == 100  # since start counts it at once

    m.tick(t0 + 1.001)
    d = doc(block, t0 + 1.5)
    w = d["window"]
    assert w["requests"] == 111
    assert w["status"]["2xx"] == 110 and w["status"]["4xx"] == 1
    assert w["series"]["t"][-1] == int(t0) and w["series"]["rps"][-1] == 111
    assert sum(w["series"]["rps"]) == 111
    h = d["routes"]["/health"]["window"]
    assert h["requests"] == 100
    assert 0.150 <= h["latency_ms"]["p50"] <= 0.300  # inside 200 us's half-octave bucket
    chat = d["routes"]["/v1/chat"]["window"]
    assert 100 <= chat["latency_ms"]["p50"] <= 200
    assert w["latency_ms"]["p99"] >= 100  # 10 of 111 are slow: p99 is a slow one
    assert w["latency_ms"]["p50"] < 1
    assert d["routes"]["other"]["status"]["4xx"] == 1

    # quiet seconds: the burst stays in the window for 60 s, then leaves it
    for k in range(2, 61):
        m.tick(t0 + k + 0.001)
    d = doc(block, t0 + 60.5)
    assert d["window"]["requests"] == 111
    assert d["window"]["series"]["rps"][0] == 111  # the oldest second of the window
    m.tick(t0 + 61.001)
    d = doc(block, t0 + 61.5)
    assert d["window"]["requests"] == 0
    assert d["window"]["latency_ms"] == {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    assert d["routes"]["/health"]["window"]["requests"] == 0
    # ... but since start keeps everything (CUM holds the closed cells)
    assert d["routes"]["/health"]["requests"] == 100
    assert d["routes"]["/v1/chat"]["requests"] == 10
    assert 100 <= d["routes"]["/v1/chat"]["latency_ms"]["p50"] <= 200


def test_rate_divides_by_the_seconds_covered(block):
    t0 = float(int(time.time()))
    m = start_worker(block, 1, t0 - 10)
    block.slot(1)[L.S_STARTED] = int(t0) - 10
    for k in range(10):  # 10 seconds, 30 responses each
        for _ in range(30):
            m.count_response(1, 200, 100)
        m.tick(t0 - 9 + k + 0.001)
    d = doc(block, t0 + 0.5)
    assert d["window"]["requests"] == 300
    # the master started "now" in this test, so the span is the worker's 10 s at most
    assert d["workers"][0]["window"]["rps"] == 30.0
    assert d["workers"][0]["window"]["rps_last"] == 30


def test_skipped_seconds_and_clock_steps(block):
    t0 = float(int(time.time()))
    m = start_worker(block, 1, t0)
    m.count_response(1, 200, 100)
    m.tick(t0 - 5)  # the wall clock stepped back: keep counting into the same cell
    m.count_response(1, 200, 100)
    assert m.stamp == int(t0)
    m.tick(t0 + 3.001)  # the loop was blocked for 3 s: seconds t0+1, t0+2 have no cell
    m.count_response(1, 500, 100)
    m.tick(t0 + 4.001)
    d = doc(block, t0 + 4.5)
    assert d["window"]["requests"] == 3
    rps = dict(zip(d["window"]["series"]["t"], d["window"]["series"]["rps"], strict=True))
    assert rps[int(t0)] == 2 and rps[int(t0) + 1] == 0 and rps[int(t0) + 3] == 1
    assert d["routes"]["/health"]["status"]["5xx"] == 1


def test_models_tokens_and_latency(block):
    t0 = float(int(time.time()))
    m = start_worker(block, 1, t0)
    m.tokens("echo", tokens_in=7)  # a stream's prompt, counted at its start
    m.model_request("echo", time.monotonic() - 0.2, tokens_out=5)
    m.model_request("llama", time.monotonic(), 3, 11, error=True)
    m.tokens("not-configured", tokens_out=2)  # counted, as "other"
    s = block.slot(1)
    assert s[L.S_TOKENS_IN] == 0 and s[L.S_TOKENS_OUT] == 0  # the caller counts the totals
    m.tick(t0 + 1.001)
    d = doc(block, t0 + 1.5)
    echo, llama = d["models"]["echo"], d["models"]["llama"]
    assert (echo["requests"], echo["tokens_in"], echo["tokens_out"]) == (1, 7, 5)
    assert echo["latency_ms"]["p50"] >= 150
    assert (llama["requests"], llama["errors"], llama["tokens_out"]) == (1, 1, 11)
    assert d["models"]["other"]["tokens_out"] == 2
    assert echo["window"]["tokens_out"] == 5 and d["window"]["tokens_out"] == 18
    assert d["window"]["series"]["tokens_out"][-1] == 18


def test_fold_keeps_since_start_and_the_last_minute(block):
    t0 = float(int(time.time()))
    m1 = start_worker(block, 1, t0)
    m2 = start_worker(block, 2, t0)
    for _ in range(40):
        m1.count_response(1, 200, 300)
    for _ in range(5):
        m2.count_response(1, 200, 300)
    m1.tick(t0 + 1.001)
    m2.tick(t0 + 1.001)
    for _ in range(7):  # in the dead worker's current, unclosed cell
        m1.count_response(2, 503, 300)
    before = doc(block, t0 + 1.5)
    block.fold(1)  # worker 1 died: the master moves its figures to slot 0
    after = doc(block, t0 + 1.5)
    assert after["routes"] == before["routes"]
    assert after["routes"]["/health"]["requests"] == 45
    assert after["routes"]["/v1/chat"]["status"]["5xx"] == 7
    assert after["window"]["requests"] == 45 and before["window"]["requests"] == 45
    assert len(after["workers"]) == 1
    # the retired ring keeps the dead worker's second t0+1 for the window too
    m2.tick(t0 + 2.001)
    d = doc(block, t0 + 2.5)
    assert d["window"]["requests"] == 52
    assert d["routes"]["/v1/chat"]["window"]["status"]["5xx"] == 7
    # and the slot is clean for the next worker
    assert not any(block.slot(1).tolist())


def test_percentile_interpolates_inside_a_bucket():
    bounds = [10, 20, 40]
    assert percentile([0, 10, 0, 0], 0.5, bounds) == 15.0
    assert percentile([0, 0, 0, 0], 0.5, bounds) == 0.0
    assert percentile([0, 0, 0, 4], 1.0, bounds) == 80.0  # +Inf: twice the last bound


def test_a_failed_generation_counts_as_an_error_of_its_model(block):
    # the real OpenAI handler and pipeline, with a provider that fails mid-answer
    import asyncio
    import json
    from types import SimpleNamespace

    from neurohttp.ai.pipeline import Pipeline
    from neurohttp.context import Counters, Services, Settings, StatsReader, UsageSink
    from neurohttp.handlers.openai import OpenAIHandlers
    from neurohttp.messages import Request

    class Unavailable(Exception):
        status = 503

    class Failing:
        async def stream(self, messages, params):
            yield "partial"
            raise Unavailable("upstream is down")

    t0 = float(int(time.time()))
    m = start_worker(block, 1, t0)
    models = SimpleNamespace(get=lambda name: (name or "echo", Failing()),
                             names=lambda: ["echo"], max_output_tokens={},
                             provider_name=lambda model: "failing")
    counters = Counters(block.slot(1), m)
    pipe = Pipeline(Services(Settings(), models, counters, m, StatsReader(block, [], []),
                             SimpleNamespace(second=int(t0)), UsageSink(counters), []))
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "x"}]})
    req = Request("POST", b"/v1/chat/completions", "1.1", [], "127.0.0.1", True, body.encode())
    resp = asyncio.run(OpenAIHandlers(pipe, 0).completions(req))
    assert resp.status == 503
    m.tick(t0 + 1.001)
    echo = doc(block, t0 + 1.5)["models"]["echo"]
    assert (echo["requests"], echo["errors"]) == (1, 1)
    s = block.slot(1)
    assert echo["tokens_in"] == s[L.S_TOKENS_IN] > 0
    assert echo["tokens_out"] == s[L.S_TOKENS_OUT] == 1  # what was produced before the failure
