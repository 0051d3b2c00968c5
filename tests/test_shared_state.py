"""Shared state (neurohttp/shared/): the limiters' arithmetic with a clock the
test sets, the table's reclaiming and its full behaviour, and real processes
forked from the block's creator hammering one limiter and one counter."""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import signal
import uuid
from typing import Any

import pytest

from neurohttp.shared.table import T_COUNT, T_RECOVERED, KeyTable
from neurohttp.stats import layout as L
from neurohttp.stats.block import StatsBlock

T0 = 1_700_000_000.0  # a fixed "now" (Unix seconds)


@pytest.fixture
def block():
    geo = L.Geometry(routes=4, models=2, max_workers=1, named_keys=4096, open_keys=64)
    blk = StatsBlock.create(f"neurohttp-test-{uuid.uuid4().hex[:12]}", geo)
    yield blk
    gc.collect()
    blk.unlink()


@pytest.fixture
def table(block) -> KeyTable:
    return block.state.named


# ---------------------------------------------------------------- GCRA
def test_gcra_burst_then_one_per_interval(table):
    rate = 10 / 60  # rpm = 10
    got = [table.admit("rpm:a", 1, rate, 10, T0) for _ in range(12)]
    assert [a.allowed for a in got] == [True] * 10 + [False] * 2
    assert [a.remaining for a in got[:10]] == list(range(9, -1, -1))
    refused = got[10]
    assert refused.retry_after == pytest.approx(6.0)  # one interval
    assert refused.reset == pytest.approx(60.0)       # the whole bucket drains in a minute
    # a refused request is not charged: 5.9 s later still refused, 6 s later one passes
    assert not table.admit("rpm:a", 1, rate, 10, T0 + 5.9).allowed
    a = table.admit("rpm:a", 1, rate, 10, T0 + 6.0)
    assert a.allowed and a.remaining == 0
    # continuously refilled: after 30 s five more, not a whole new window
    assert sum(table.admit("rpm:a", 1, rate, 10, T0 + 36.0).allowed for _ in range(10)) == 5
    # other keys are independent
    assert table.admit("rpm:b", 1, rate, 10, T0).remaining == 9


def test_gcra_variable_cost_and_debt(table):
    tpm = 1000 / 60
    assert table.admit("tpm:k", 600, tpm, 1000, T0).allowed
    a = table.admit("tpm:k", 600, tpm, 1000, T0)  # 400 left: refused, says when 600 fit
    assert not a.allowed and a.retry_after == pytest.approx(12.0) and a.remaining == 400
    assert table.admit("tpm:k", 400, tpm, 1000, T0).allowed
    # a stream that ran past its tokens: charged anyway, the next request waits
    over = table.charge("tpm:k", 500, tpm, 1000, T0 + 1)
    assert not over.allowed and over.remaining == 0
    wait = table.admit("tpm:k", 1, tpm, 1000, T0 + 1)
    assert not wait.allowed and wait.retry_after == pytest.approx(29.0 + 0.06, abs=0.01)
    assert table.admit("tpm:k", 1, tpm, 1000, T0 + 30.1).allowed
    # a cost above the burst can never pass
    never = table.admit("tpm:other", 1001, tpm, 1000, T0)
    assert not never.allowed and math.isinf(never.retry_after)


# ---------------------------------------------------------------- fixed window, counters
def test_daily_quota_resets_at_utc_midnight(table):
    day = 86400
    midnight = (T0 // day + 1) * day
    assert table.quota("day:k", 900, 1000, day, midnight - 10).allowed
    a = table.quota("day:k", 200, 1000, day, midnight - 5)
    assert not a.allowed and a.remaining == 100 and a.retry_after == pytest.approx(5.0)
    assert table.quota("day:k", 200, 1000, day, midnight - 5, force=True).remaining == 0
    b = table.quota("day:k", 200, 1000, day, midnight)  # a new day
    assert b.allowed and b.remaining == 800 and b.reset == pytest.approx(day)


def test_exact_counter(table):
    assert table.get("c") == 0
    assert table.add("c", 5) == 5
    assert table.add("c", -2) == 3
    assert table.get("c") == 3
    assert table.add("c", -3) == 0
    # back at 0 the entry says nothing an absent one would not: it may be dropped
    table._lock()
    try:
        table._sweep(int(T0 * 1e6), table.cap)
    finally:
        from neurohttp.shared.mutex import unlock
        unlock(table.addr)
    assert table.w[T_COUNT] == 0 and table.get("c") == 0


# ---------------------------------------------------------------- the table
def test_lapsed_entries_are_reclaimed_and_a_full_table_refuses(block):
    table = block.state.open  # 64 entries: full at 56
    rate = 1.0  # one per second, burst 1: an entry lapses 1 s after its request
    for i in range(56):
        assert table.admit(f"ip:{i}", 1, rate, 1, T0).allowed
    assert table.w[T_COUNT] == 56
    # full of live entries: a new key is refused as over its limit, and counted
    full = table.admit("ip:new", 1, rate, 1, T0 + 0.5)
    assert not full.allowed and full.retry_after == 1.0
    assert table.figures()["full"] == 1
    # keys already in the table are served as ever
    assert not table.admit("ip:3", 1, rate, 1, T0 + 0.5).allowed
    assert table.admit("ip:3", 1, rate, 1, T0 + 1.0).allowed
    # once the entries lapse, new keys take their room (the sweep runs at most
    # once a second when the table is nearly full)
    assert table.admit("ip:new", 1, rate, 1, T0 + 2.0).allowed
    assert table.figures()["reclaimed"] >= 1 and table.w[T_COUNT] <= 56
    # a table kept full of live keys: each new key sweeps, and takes a lapsed one's room
    for i in range(300):
        assert table.admit(f"ip:x{i}", 1, rate, 1, T0 + 3 + i).allowed
    assert table.w[T_COUNT] <= 56 and table.figures()["full"] == 1
    # long-lived keys among lapsing ones: each is found again after the shifts
    # that dropping the lapsed ones around it made
    later = T0 + 1000
    for i in range(40):
        assert table.admit(f"k:{i}", 1, 1 / 1000, 1, later).allowed
    for i in range(40):
        assert not table.admit(f"k:{i}", 1, 1 / 1000, 1, later + 1).allowed


def test_entries_survive_deletion_shifts():
    # the backward-shift deletion keeps every probe run intact, whatever order
    # keys come and go in (a model: a dict)
    import random

    from neurohttp.shared.mutex import buffer_address
    from neurohttp.shared.table import table_words

    buf = memoryview(bytearray(table_words(64) * 8))
    words = buf.cast("q")
    KeyTable.init(words, buffer_address(buf), 64)
    t = KeyTable(words, buffer_address(buf), "test")
    model: dict[str, int] = {}
    rnd = random.Random(7)
    for step in range(5000):
        k = f"k{rnd.randrange(80)}"
        n = rnd.choice([1, 1, -1, -2])
        if model.get(k, 0) + n < 0 or (k not in model and len(model) >= 50):
            continue
        model[k] = t.add(k, n)
        if model[k] == 0:
            del model[k]
        if step % 50 == 0:  # drop the zeros (lapsed) now and then
            t._lock()
            try:
                t._sweep(0, 64)
            finally:
                from neurohttp.shared.mutex import unlock
                unlock(t.addr)
        assert all(t.get(key) == v for key, v in model.items())
    t.w.release()
    del words, buf, t


# ---------------------------------------------------------------- real processes
KEYS = 2000


def _hammer(name: str, what: str, n: int, go: Any, total: Any) -> None:
    block = StatsBlock.attach(name)
    table = block.state.named
    go.wait(10)
    allowed = 0
    for i in range(n):
        if what == "limit":  # KEYS limiters in turn, each rpm = burst = 10
            allowed += table.admit(f"rpm:{i % KEYS}", 1, 10 / 60, 10).allowed
        else:
            table.add("counter", 1)
    with total.get_lock():
        total.value += allowed
    os._exit(0)


def _run(block: StatsBlock, what: str, procs: int, n: int) -> int:
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    total = ctx.Value("q", 0)
    ps = [ctx.Process(target=_hammer, args=(block.shm.name, what, n, go, total))
          for _ in range(procs)]
    try:
        for p in ps:
            p.start()
        go.set()
        for p in ps:
            p.join(60)
        assert [p.exitcode for p in ps] == [0] * procs
        return int(total.value)
    finally:
        for p in ps:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)


def test_processes_hammering_one_limiter_get_exactly_the_burst(block):
    # 8 processes ask each of 2000 limiters 12 times, in the same order, so they
    # contend on each: every limiter admits exactly its burst of 10, in all
    assert _run(block, "limit", procs=8, n=12 * KEYS) == 10 * KEYS


def test_processes_adding_to_one_counter_end_at_k_times_m(block):
    _run(block, "count", procs=6, n=2000)
    assert block.state.named.get("counter") == 6 * 2000


def _die_holding_the_lock(name: str) -> None:
    table = StatsBlock.attach(name).state.named
    table._lock()
    os.kill(os.getpid(), signal.SIGKILL)  # dies inside the section


def test_a_process_killed_holding_the_lock_does_not_block_the_others(block):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_die_holding_the_lock, args=(block.shm.name,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    table = block.state.named
    assert table.add("after", 1) == 1  # would block for good with a semaphore
    assert table.w[T_RECOVERED] == 1
    assert table.figures()["recovered"] == 1
