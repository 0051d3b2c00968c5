"""Per-key quotas, sans server: the batched admission (rpm, tpm, daily under one
lock, shared/table.py; one Lua script, shared/redis_store.py) against the
Store's single operations, with a clock the test sets; exact under processes
that contend for it; the same answers from a real Redis; the minute boundary;
keys, digests, headers and the CLI."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import uuid
from typing import Any

import pytest
from redis_server import redis_server  # noqa: F401  (fixture)
from server import ROOT

from neurohttp import config
from neurohttp.config import KeySpec
from neurohttp.security.gate import duration
from neurohttp.security.keys import (
    INVALID,
    MALFORMED,
    MISSING,
    KeyRing,
    digest,
    new_key,
    presented,
)
from neurohttp.shared.keylimits import DAILY, REQUESTS, TOKENS, KeyLimits
from neurohttp.shared.redis_store import RedisStore, connect
from neurohttp.stats import layout as L
from neurohttp.stats.block import StatsBlock

T0 = 1_700_000_000.0
DAY = 86400


@pytest.fixture
def block():
    geo = L.Geometry(routes=4, models=2, max_workers=1, named_keys=4096, open_keys=64)
    blk = StatsBlock.create(f"neurohttp-test-{uuid.uuid4().hex[:12]}", geo)
    yield blk
    gc.collect()
    blk.unlink()


@pytest.fixture
def table(block):
    return block.state.named


# ---------------------------------------------------------------- the batched admission
def test_key_admission_agrees_with_the_single_operations(table):
    """Random requests and charges: key_admit/key_charge answer as admit (rpm),
    a one-token admit that is not charged (tpm) and quota (daily) would."""
    rng = random.Random(7)
    k = KeyLimits("k", rpm=7, tpm=300, daily=2000)
    t = T0 + DAY - 200  # crosses a UTC midnight on the way
    for _ in range(600):
        t += rng.choice((0.0, 0.5, 3.0, 11.0))
        if rng.random() < 0.6:
            v = table.key_admit(k, t)
            r = table.admit("s:rpm", 1, 7 / 60, 7, t, debt=False)
            tok = table.admit("s:tpm", 1, 300 / 60, 300, t)
            day = table.quota("s:day", 1, 2000, DAY, t)
            if tok.allowed:  # that admit was only a look: give its token back
                table.w[table._find(hash("s:tpm") or 1, hash("s:tpm\0")) + 2] -= k.tpm_step
            if day.allowed:
                table.quota("s:day", -1, 2000, DAY, t, force=True)
            expect = r.allowed and tok.allowed and day.allowed
            assert v.allowed == expect, (t, v, r, tok, day)
            if not expect and r.allowed:  # refused by tokens or the day: not charged
                table.admit("s:rpm", -1, 7 / 60, 7, t, debt=True)
            if not r.allowed:
                assert v.refused == REQUESTS
            elif not tok.allowed:
                assert v.refused == TOKENS
            elif not day.allowed:
                assert v.refused == DAILY
        else:
            n = rng.randint(1, 120)
            table.key_charge(k, n, 0, t)
            table.charge("s:tpm", n, 300 / 60, 300, t)
            table.quota("s:day", n, 2000, DAY, t, force=True)


def test_rpm_bucket_burst_then_one_every_interval(table):
    k = KeyLimits("team", rpm=10)
    got = [table.key_admit(k, T0) for _ in range(12)]
    assert [v.allowed for v in got] == [True] * 10 + [False] * 2
    assert [v.requests_remaining for v in got[:10]] == list(range(9, -1, -1))
    assert got[10].refused == REQUESTS and got[10].retry_after == pytest.approx(6.0)
    assert got[0].requests_reset == pytest.approx(6.0) and got[9].requests_reset == pytest.approx(60.0)
    assert not table.key_admit(k, T0 + 5.9).allowed
    assert table.key_admit(k, T0 + 6.0).allowed
    assert table.key_figures(k) == {"requests": 11, "tokens_in": 0, "tokens_out": 0,
                                    "forbidden": 0, "rate_limited": 3}


@pytest.mark.parametrize("second", [59.9, 59.999])
def test_no_double_window_at_the_minute_boundary(table, second):
    """A burst at :59 and another at :00: a fixed per-minute window would admit
    2 x 10; the bucket admits 10, then one more per 6 s."""
    minute = (T0 // 60 + 1) * 60 - 60 + second
    k = KeyLimits("edge", rpm=10)
    first = sum(table.key_admit(k, minute).allowed for _ in range(20))
    later = sum(table.key_admit(k, minute + 0.2).allowed for _ in range(20))
    assert (first, later) == (10, 0)
    assert sum(table.key_admit(k, minute + 6.1).allowed for _ in range(20)) == 1


def test_tokens_go_into_debt_and_the_next_request_waits(table):
    k = KeyLimits("t", tpm=600)  # 10 tokens a second
    assert table.key_admit(k, T0).allowed
    table.key_charge(k, 100, 800, T0)  # a stream ran 300 past the bucket
    v = table.key_admit(k, T0 + 1)
    assert not v.allowed and v.refused == TOKENS and v.tokens_remaining == 0
    assert v.retry_after == pytest.approx(29.1, abs=0.01)  # 290 tokens owed + one to spend
    assert table.key_admit(k, T0 + 30.2).allowed
    f = table.key_figures(k)
    assert (f["tokens_in"], f["tokens_out"], f["requests"], f["rate_limited"]) == (100, 800, 2, 1)


def test_daily_tokens_end_at_utc_midnight(table):
    midnight = (T0 // DAY + 1) * DAY
    k = KeyLimits("d", daily=1000)
    assert table.key_admit(k, midnight - 10).allowed
    table.key_charge(k, 400, 700, midnight - 10)
    v = table.key_admit(k, midnight - 5)
    assert not v.allowed and v.refused == DAILY and v.retry_after == pytest.approx(5.0)
    assert v.daily_remaining == 0
    v = table.key_admit(k, midnight + 1)
    assert v.allowed and v.daily_remaining == 1000 and v.daily_reset == pytest.approx(DAY - 1)


def _hammer(name: str, go, n: int, out) -> None:
    table = StatsBlock.attach(name).state.named
    k = KeyLimits("shared", rpm=10, tpm=10**6)
    go.wait(30)
    out.put(sum(table.key_admit(k, T0).allowed for _ in range(n)))


def test_processes_contending_for_one_key_get_exactly_its_rpm(block):
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_hammer, args=(block.shm.name, go, 50, out)) for _ in range(6)]
    for p in ps:
        p.start()
    try:
        go.set()
        admitted = sum(out.get(timeout=60) for _ in ps)
        for p in ps:
            p.join(30)
    finally:
        for p in ps:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGKILL)
    assert admitted == 10
    f = block.state.named.key_figures(KeyLimits("shared"))
    assert f["requests"] == 10 and f["rate_limited"] == 290


# ---------------------------------------------------------------- Redis
def _redis_run(url: str, steps) -> list:
    async def main() -> list:
        client = connect(url, 1.0)
        st = RedisStore(client, prefix=f"test-{uuid.uuid4().hex[:8]}:")
        out = []
        for op, k, t, *n in steps:
            if op == "admit":
                out.append(await st.key_admit(k, t))
            else:
                await st.key_charge(k, n[0], t)
        await client.aclose()
        return out
    return asyncio.run(main())


def test_redis_script_answers_as_the_shared_memory_table(table, redis_server):  # noqa: F811
    """The Lua transcription of the admission gives the same verdicts, field
    by field, as the shared-memory table over the same random sequence."""
    rng = random.Random(11)
    k = KeyLimits("k", rpm=9, tpm=500, daily=3000)
    t = T0 + DAY - 300
    steps = []
    for _ in range(400):
        t += rng.choice((0.0, 0.25, 2.0, 9.0))
        if rng.random() < 0.65:
            steps.append(("admit", k, t))
        else:
            steps.append(("charge", k, t, rng.randint(1, 200)))
    shm = []
    for op, kk, tt, *n in steps:
        if op == "admit":
            shm.append(table.key_admit(kk, tt))
        else:
            table.key_charge(kk, n[0], 0, tt)
    red = _redis_run(redis_server.url, steps)
    assert len(red) == len(shm)
    for a, b in zip(shm, red, strict=True):
        assert a.allowed == b.allowed and a.refused == b.refused
        assert (a.requests_remaining, a.tokens_remaining, a.daily_remaining) == \
            (b.requests_remaining, b.tokens_remaining, b.daily_remaining)
        for x, y in ((a.retry_after, b.retry_after), (a.requests_reset, b.requests_reset),
                     (a.tokens_reset, b.tokens_reset), (a.daily_reset, b.daily_reset)):
            assert x == pytest.approx(y, abs=1e-6)
    assert sum(v.allowed for v in red) > 20 and sum(not v.allowed for v in red) > 20


def test_redis_no_double_window_at_the_minute_boundary(redis_server):  # noqa: F811
    minute = (T0 // 60 + 1) * 60
    k = KeyLimits("edge", rpm=10)
    steps = [("admit", k, minute - 0.1)] * 20 + [("admit", k, minute + 0.1)] * 20
    got = _redis_run(redis_server.url, steps)
    assert sum(v.allowed for v in got[:20]) == 10 and sum(v.allowed for v in got[20:]) == 0


def test_redis_admission_uses_the_servers_clock(redis_server):  # noqa: F811
    """Without `now` the script reads Redis's TIME: a fresh key's day ends at
    the next UTC midnight of the Redis server's clock."""
    import time
    got = _redis_run(redis_server.url, [("admit", KeyLimits("c", rpm=5, daily=10), None)])
    v = got[0]
    now = time.time()
    assert v.allowed and v.requests_remaining == 4
    assert v.daily_reset == pytest.approx(DAY - now % DAY, abs=5)


# ---------------------------------------------------------------- keys
def test_new_keys_and_digests():
    a, b = new_key(), new_key()
    assert a != b and a.startswith("nh-") and len(a) == 46
    assert digest(a) == hashlib.sha256(a.encode()).hexdigest()
    assert digest(a.encode()) == digest(a)


def test_what_a_request_presents():
    k = b"nh-abc"
    assert presented([]) is None
    assert presented([(b"Host", b"x")]) is None
    assert presented([(b"Authorization", b"Bearer nh-abc")]) == k
    assert presented([(b"AUTHORIZATION", b"bEaReR   nh-abc ")]) == k
    assert presented([(b"x-api-key", b"nh-abc")]) == k
    assert presented([(b"X-Api-KEY", b" nh-abc")]) == k
    # Authorization wins over x-api-key
    assert presented([(b"x-api-key", b"other"), (b"Authorization", b"Bearer nh-abc")]) == k
    assert presented([(b"Authorization", b"Basic nh-abc")]) == b""
    assert presented([(b"Authorization", b"Bearer a"), (b"authorization", b"Bearer a")]) == b""
    assert presented([(b"x-api-key", b"a"), (b"x-api-key", b"a")]) == b""


def test_key_ring_identifies_by_digest_only():
    key = new_key()
    ring = KeyRing([KeySpec("a", digest(key), 0, 0, 0, [])])
    # the configured ring holds digests, not keys
    assert key.encode() not in repr(vars(ring)).encode()
    assert ring.identify([(b"Authorization", b"Bearer " + key.encode())]).name == "a"
    assert ring.identify([]) == MISSING
    assert ring.identify([(b"Authorization", b"Bearer " + key.encode()[:-1])]) == INVALID
    assert ring.identify([(b"Authorization", b"Bearer nh-a b")]) == MALFORMED
    assert ring.identify([(b"Authorization", b"Bearer ")]) == MALFORMED
    assert ring.identify([(b"x-api-key", b"nh-\xff")]) == MALFORMED


def test_key_ring_remembers_accepted_values_only(monkeypatch):
    """A value accepted once skips the hash next time; a wrong or malformed one
    is hashed every time and never remembered; the memory is bounded."""
    from neurohttp.security import keys
    key, other = new_key(), new_key()
    ring = KeyRing([KeySpec("a", digest(key), 0, 0, 0, [])])
    hashed: list[bytes] = []
    real = keys.hashlib.sha256

    class Spy:
        @staticmethod
        def sha256(data: bytes) -> Any:
            hashed.append(data)
            return real(data)
    monkeypatch.setattr(keys, "hashlib", Spy)
    good = [(b"Authorization", b"Bearer " + key.encode())]
    assert [ring.identify(good).name for _ in range(3)] == ["a"] * 3
    assert ring.identify([(b"X-API-Key", key.encode())]).name == "a"
    assert ring.identify([(b"x-api-key", key.encode())]).name == "a"
    assert hashed == [key.encode()] * 2  # once per distinct (field, value)
    bad = [(b"Authorization", b"Bearer " + other.encode())]
    assert [ring.identify(bad) for _ in range(3)] == [INVALID] * 3
    assert hashed.count(other.encode()) == 3
    # a good value as the other field's value, or twice: not taken from memory
    assert ring.identify([(b"x-api-key", b"Bearer " + key.encode())]) == MALFORMED
    assert ring.identify(good + good) == MALFORMED
    assert ring.identify([(b"x-api-key", key.encode())] * 2) == MALFORMED
    assert other.encode() not in repr(vars(ring)).encode()
    for i in range(3 * keys.SEEN_MAX):
        ring.identify([(b"Authorization", b"Bearer " + b" " * i + key.encode())])
    assert all(len(seen) <= keys.SEEN_MAX for seen in ring._seen)


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (0.0004, "1ms"), (0.02, "20ms"), (0.999, "999ms"), (1, "1s"), (6, "6s"),
    (17.28, "17.28s"), (59.9999, "1m0s"), (60, "1m0s"), (90.5, "1m30.5s"),
    (3600, "1h0m0s"), (86399.25, "23h59m59.25s")])
def test_reset_durations_are_written_as_openai_does(seconds, text):
    assert duration(seconds) == text


# ---------------------------------------------------------------- config and CLI
def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurohttp", *args], input=stdin,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_keys_new_prints_a_key_once_and_a_table_that_loads(tmp_path):
    r = _cli("keys", "new", "team-a", "--rpm", "10", "--tpm", "5000", "--daily-tokens",
             "100000", "--models", "echo")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    key = next(line for line in lines if line.startswith("nh-"))
    table = r.stdout[r.stdout.index("[[auth.keys]]"):]
    assert key not in table and digest(key) in table
    conf = tmp_path / "n.toml"
    conf.write_text("[auth]\nenabled = true\n\n" + table)
    cfg = config.load(str(conf))
    (spec,) = cfg.auth.keys
    assert (spec.name, spec.rpm, spec.tpm, spec.daily_tokens, spec.models) == \
        ("team-a", 10, 5000, 100000, ["echo"])
    assert KeyRing(cfg.auth.keys).identify([(b"x-api-key", key.encode())]).name == "team-a"
    h = _cli("keys", "hash", stdin=key + "\n")
    assert h.returncode == 0 and h.stdout.strip() == spec.sha256
    assert _cli("keys", "hash").returncode != 0  # nothing on stdin
    assert _cli("keys", "new", "bad name").returncode != 0


@pytest.mark.parametrize("text,needle", [
    ("[auth]\nenabled = true\n", "auth.enabled is true but there is no [[auth.keys]]"),
    ("[[auth.keys]]\nname = 'a'\n", "auth.keys[0].sha256 is required"),
    ("[[auth.keys]]\nname = 'a'\nsha256 = 'XYZ'\n", "auth.keys[0].sha256 must be the 64"),
    ("[[auth.keys]]\nname = 'a b'\nsha256 = '" + "0" * 64 + "'\n", "auth.keys[0].name"),
    ("[[auth.keys]]\nname = 'a'\nsha256 = '" + "0" * 64 + "'\nrpm = -1\n", "auth.keys[0].rpm"),
    ("[[auth.keys]]\nname = 'a'\nsha256 = '" + "0" * 64 + "'\nmodels = ['gpt']\n",
     "auth.keys[0].models: unknown model 'gpt'"),
    ("[[auth.keys]]\nname = 'a'\nsha256 = '" + "0" * 64 + "'\nfoo = 1\n",
     "unknown key 'auth.keys[0].foo'"),
    ("[[auth.keys]]\nname = 'a'\nsha256 = '" + "0" * 64 + "'\n[[auth.keys]]\nname = 'a'\n"
     "sha256 = '" + "1" * 64 + "'\n", "auth.keys[1].name: 'a' is used by another key"),
    ("[[auth.keys]]\nname = 'a'\nsha256 = '" + "0" * 64 + "'\n[[auth.keys]]\nname = 'b'\n"
     "sha256 = '" + "0" * 64 + "'\n", "auth.keys[1].sha256: the same key is listed twice"),
    ("[auth]\nprotect = ['v1']\n", "auth.protect must be a list of path prefixes"),
    ("[state]\nbackend = 'memcached'\n", "state.backend must be one of"),
    ("[state]\nurl = 'http://x'\n", "state.url must be a redis://"),
    ("[state]\non_redis_error = 'maybe'\n", "state.on_redis_error must be one of"),
    ("[state]\ntimeout_ms = 0\n", "state.timeout_ms"),
])
def test_auth_and_state_errors_name_the_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert needle in str(e.value) and str(path) in str(e.value)


# ---------------------------------------------------------------- the gate's usage subscriber
def _gate(table, quotas=None):
    from neurohttp.security.gate import Gate
    from neurohttp.security.quotas import ShmQuotas
    ring = KeyRing([KeySpec("team", "0" * 64, 0, 600, 0, [])])
    return Gate(ring, quotas or ShmQuotas(table), ["/v1/"], [], "echo", table.add), ring


def test_usage_charges_reach_the_keys_bucket(table):
    """charge(model, key, prompt, completion), as the usage event calls it:
    tokens into the key's tpm bucket (debt) and its figures; unknown or no key: nothing."""
    gate, ring = _gate(table)
    limits = ring.by_name["team"].limits
    assert table.key_admit(limits).allowed
    gate.charge("echo", "team", 100, 0)
    for _ in range(7):
        gate.charge("echo", "team", 0, 100)  # a stream, 100 tokens at a time
    gate.charge("echo", None, 5, 5)
    gate.charge("echo", "nobody", 5, 5)
    v = table.key_admit(limits)
    assert not v.allowed and v.refused == TOKENS and v.retry_after > 19
    f = table.key_figures(limits)
    assert (f["tokens_in"], f["tokens_out"]) == (100, 700)


def test_redis_charges_of_one_loop_turn_go_in_one_pipeline(table, redis_server):  # noqa: F811
    from neurohttp.security.quotas import RedisQuotas

    async def main():
        client = connect(redis_server.url, 1.0)
        store = RedisStore(client, prefix=f"test-{uuid.uuid4().hex[:8]}:")
        quotas = RedisQuotas(store, table, 1.0, fail_open=False)
        gate, ring = _gate(table, quotas)
        limits = ring.by_name["team"].limits
        assert (await quotas.admit(limits)).allowed
        sent = []
        real = store.key_charge_many

        async def spy(charges, now=None):
            sent.append(len(charges))
            await real(charges, now)
        store.key_charge_many = spy
        for _ in range(8):
            gate.charge("echo", "team", 0, 100)
        for _ in range(20):
            await asyncio.sleep(0.01)
        v = await quotas.admit(limits)
        await client.aclose()
        return sent, v
    sent, v = asyncio.run(main())
    assert sent == [8]
    assert not v.allowed and v.refused == TOKENS
    f = table.key_figures(KeyLimits("team"))
    assert f["tokens_out"] == 800 and f["requests"] == 1 and f["rate_limited"] == 1
