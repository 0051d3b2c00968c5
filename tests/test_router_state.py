"""The router's shared state without a server: the records (assign, fold,
find), the circuit breaker, the retry budget and the balancing strategies,
on a real area of memory and a fake clock (µs of CLOCK_MONOTONIC passed in)."""

from __future__ import annotations

import mmap
import os
from collections import Counter

import pytest

from neurohttp.gateway import breaker as B
from neurohttp.gateway.breaker import DeploymentState
from neurohttp.gateway.budget import FLOOR, WINDOW_US, RetryBudget
from neurohttp.gateway.policy import (
    STALE_US,
    LeastOutstanding,
    LowestLatency,
    RoundRobin,
    Weighted,
    make_strategy,
)
from neurohttp.shared import deployments as D
from neurohttp.shared.mutex import buffer_address

S = 1_000_000  # µs


def area(capacity: int = 8, nslots: int = 5) -> tuple[D.DeploymentTable, mmap.mmap]:
    m = mmap.mmap(-1, D.area_words(capacity, nslots) * 8)  # shared with children, as the block is
    buf = memoryview(m)
    D.DeploymentTable.init(buf.cast("q"), buffer_address(buf), capacity, nslots)
    return D.DeploymentTable(buf.cast("q"), buffer_address(buf)), m


def dep(t: D.DeploymentTable, fp: int, slot: int = 1, failures: int = 3,
        cooldown: float = 10.0, lease: float = 5.0) -> DeploymentState:
    i = t.find(fp)
    assert i >= 0
    return DeploymentState(t, i, slot, failures, cooldown, lease)


def assigned(t: D.DeploymentTable, *fps: int, gen: int = 1, oldest: int = 1) -> None:
    t.assign([(fp, D.KIND_DEPLOYMENT) for fp in fps], gen, oldest)


# ------------------------------------------------------------------ records
def test_fingerprints_follow_the_tables():
    models = {"a": {"strategy": "round_robin", "deployments": [
        {"provider": "openai", "base_url": "http://x/v1", "model": "m"},
        {"provider": "openai", "base_url": "http://x/v1", "model": "m"},   # the same twice
        {"provider": "openai", "base_url": "http://y/v1", "model": "m"}]},
        "echo": {"provider": "echo"}}
    mf, df = D.config_fingerprints(models)
    assert set(mf) == {"a", "echo"} and len(df) == 4
    assert len(set(df.values()) | set(mf.values())) == 6     # identical tables told apart
    assert D.records_needed(models) == 6
    # another process computes the same (no per-process hash seed)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, repr(D.config_fingerprints(models)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 65536).decode() == repr((mf, df))
    # a changed key makes a new deployment; the others keep theirs
    models["a"]["deployments"][2]["model"] = "m2"
    mf2, df2 = D.config_fingerprints(models)
    assert df2[("a", 2)] != df[("a", 2)] and df2[("a", 0)] == df[("a", 0)] and mf2 == mf


def test_assign_keeps_unchanged_records_and_reuses_retired_ones_only_when_free():
    t, _m = area(capacity=4)
    assigned(t, 11, 12, gen=1)
    a = dep(t, 11)
    a.failure(1 * S)
    assert t.w[t.base(a.index) + D.R_BR_FAILS] == 1
    # reload: 11 stays, 12 leaves, 13 and 14 come; generation 1 still lives
    assigned(t, 11, 13, 14, gen=2, oldest=1)
    assert t.find(11) == a.index and t.w[t.base(a.index) + D.R_BR_FAILS] == 1
    assert t.find(12) >= 0 and t.w[t.base(t.find(12)) + D.R_RETIRED] == 2
    # a third config needs a record: 12's is still used by generation 1's workers
    with pytest.raises(D.RouterStateFull, match=r"max_deployments"):
        assigned(t, 11, 13, 14, 15, gen=3, oldest=1)
    assert t.find(15) == -1 and t.find(12) >= 0  # nothing changed
    # once generation 1 is gone, 12's record is reused, cleared
    old12 = t.find(12)
    t.w[t.column(old12, D.C_REQUESTS) + 1] = 7
    assigned(t, 11, 13, 14, 15, gen=3, oldest=2)
    assert t.find(12) == -1 and t.find(15) == old12
    assert t.sum(old12, D.C_REQUESTS) == 0 and t.w[t.base(old12) + D.R_RETIRED] == 0


def test_figure_pairs_follow_the_records_and_are_given_back_only_when_free():
    t, _m = area(capacity=8)

    def pair(fp: int) -> int:
        return t.figure_pair(t.find(fp))

    assert t.assign([(11, D.KIND_DEPLOYMENT), (12, D.KIND_DEPLOYMENT), (1, D.KIND_MODEL)],
                    1, 1, fig_pairs=3) == [0, 1]
    assert (pair(11), pair(12), pair(1)) == (0, 1, -1)   # a model has no pair
    # reversed, and 13 in place of 12 while generation 1 lives: 12 keeps its pair
    assert t.assign([(13, D.KIND_DEPLOYMENT), (11, D.KIND_DEPLOYMENT)], 2, 1, 3) == [2]
    assert (pair(11), pair(12), pair(13)) == (0, 1, 2)
    # no pair left: 14 is not counted (and nothing else moves)
    assert t.assign([(11, D.KIND_DEPLOYMENT), (13, D.KIND_DEPLOYMENT),
                     (14, D.KIND_DEPLOYMENT)], 3, 1, 3) == []
    assert pair(14) == -1 and (pair(11), pair(13)) == (0, 2)
    # generations 1 to 3 gone: 12's record is free, its pair goes to the next new one
    assert t.assign([(11, D.KIND_DEPLOYMENT), (15, D.KIND_DEPLOYMENT)], 4, 4, 3) == [1]
    assert (pair(11), pair(15)) == (0, 1)


def test_fold_keeps_counts_and_drops_outstanding():
    t, _m = area(nslots=4)
    assigned(t, 21)
    d1, d2 = dep(t, 21, slot=1), dep(t, 21, slot=2)
    for d in (d1, d1, d2):
        d.begin(retry=False, hedge=False)
    d1.begin(retry=True, hedge=False)
    assert d1.outstanding() == 4 and t.sum(d1.index, D.C_REQUESTS) == 4
    assert t.fold(1) == 3  # slot 1 died with 3 in flight
    assert d2.outstanding() == 1
    assert t.sum(d1.index, D.C_REQUESTS) == 4 and t.sum(d1.index, D.C_RETRIES) == 1
    head, cols = t.figures(d1.index)
    assert cols[D.C_REQUESTS] == 4 and cols[D.C_OUTSTANDING] == 1


def test_outstanding_is_summed_across_processes():
    t, _m = area(nslots=4)
    assigned(t, 31)
    mine = dep(t, 31, slot=1)
    pid = os.fork()
    if pid == 0:
        other = dep(t, 31, slot=2)
        for _ in range(5):
            other.begin(retry=False, hedge=False)
        os._exit(0)
    os.waitpid(pid, 0)
    mine.begin(retry=False, hedge=False)
    assert mine.outstanding() == 6


# ------------------------------------------------------------------ breaker
def test_breaker_opens_after_consecutive_failures_only():
    t, _m = area()
    assigned(t, 41)
    d = dep(t, 41, failures=3, cooldown=10.0)
    d.failure(0)
    d.failure(0)
    d.success()  # a success in between: the count starts again
    d.failure(2)
    d.failure(3)
    assert d.state(4) == B.READY
    d.failure(5)
    assert d.state(6) == B.BLOCKED
    assert t.w[d.b + D.R_BR_STATE] == D.OPEN and t.w[d.b + D.R_BR_OPENED] == 1


def test_breaker_half_open_single_probe_then_closes():
    t, _m = area()
    assigned(t, 42)
    a = dep(t, 42, slot=1, failures=1, cooldown=10.0, lease=30.0)
    b = dep(t, 42, slot=2, failures=1, cooldown=10.0, lease=30.0)
    a.failure(0)
    assert a.state(9 * S) == B.BLOCKED and not a.claim_probe(9 * S)
    assert b.state(10 * S) == B.PROBE
    assert b.claim_probe(10 * S)           # one worker takes the probe ...
    assert not a.claim_probe(10 * S + 1)   # ... and no other may
    assert a.state(11 * S) == B.BLOCKED
    b.success()
    assert a.state(12 * S) == B.READY
    w = t.w
    assert (w[a.b + D.R_BR_STATE], w[a.b + D.R_BR_PROBES], w[a.b + D.R_BR_CLOSED]) == (D.CLOSED, 1, 1)


def test_breaker_probe_failure_reopens_for_another_cooldown():
    t, _m = area()
    assigned(t, 43)
    d = dep(t, 43, failures=2, cooldown=10.0, lease=1.0)
    d.failure(0)
    d.failure(0)
    assert d.claim_probe(10 * S)
    d.failure(11 * S)
    assert t.w[d.b + D.R_BR_STATE] == D.OPEN and t.w[d.b + D.R_BR_OPENED] == 2
    assert d.state(20 * S) == B.BLOCKED and d.state(21 * S) == B.PROBE


def test_breaker_lost_probe_lease_lets_another_probe():
    t, _m = area()
    assigned(t, 44)
    d = dep(t, 44, failures=1, cooldown=2.0, lease=5.0)
    d.failure(0)
    assert d.claim_probe(2 * S)       # its worker is killed: no outcome ever comes
    assert not d.claim_probe(6 * S)
    assert d.claim_probe(7 * S)       # the lease (5 s) ended


def test_breaker_off_with_zero_failures():
    t, _m = area()
    assigned(t, 45)
    d = dep(t, 45, failures=0)
    for i in range(100):
        d.failure(i)
    assert d.state(200) == B.READY


def test_retry_after_blocks_until_then():
    t, _m = area()
    assigned(t, 46)
    d = dep(t, 46)
    d.retry_after(3.0, 429, 1 * S)
    d.retry_after(1.0, 503, 1 * S)  # a shorter one does not shorten it
    assert d.state(3 * S) == B.BLOCKED and d.available_at() == 4 * S
    assert d.retry_after_status() == 429
    assert d.state(4 * S) == B.READY


def test_ttfb_ewma():
    t, _m = area()
    assigned(t, 47)
    d = dep(t, 47)
    d.measured(4000, 1)
    assert d.ttfb_us() == 4000
    d.measured(8000, 2)
    assert d.ttfb_us() == 5000 and d.ttfb_at() == 2


# ------------------------------------------------------------------ budget
def budget(t: D.DeploymentTable, ratio: float = 0.2, slot: int = 1) -> RetryBudget:
    t.assign([(51, D.KIND_MODEL)], 1, 1)
    return RetryBudget(t, t.find(51), slot, ratio)


def test_budget_allows_ratio_of_requests_in_the_window():
    t, _m = area()
    b = budget(t)
    now = 1 * S
    b.spend(now)  # opens the window
    for _ in range(100):
        b.request()
    got = sum(b.spend(now) for _ in range(100))
    assert got == 20 - 1  # 20% of 100, the first retry included
    assert t.w[b.b + D.R_BUD_REFUSED] == 100 - got
    assert t.sum(b.index, D.C_RETRIES) == 20


def test_budget_floor_lets_a_quiet_model_retry():
    t, _m = area()
    b = budget(t)
    b.request()
    assert [b.spend(5 * S) for _ in range(FLOOR + 1)] == [True] * FLOOR + [False]


def test_budget_slides_and_is_shared_by_workers():
    t, _m = area(nslots=4)
    b1, b2 = budget(t, slot=1), budget(t, slot=2)
    now = 1 * S
    for _ in range(50):
        b1.request()
        b2.request()
    b1.spend(now)  # the window starts with 100 requests behind it
    for _ in range(100):
        b2.request()
    assert sum(b1.spend(now) + b2.spend(now) for _ in range(30)) == 19  # 20 of 100 in it
    # half way into the next window: half of the last one still counts
    now += WINDOW_US + WINDOW_US // 2
    assert not b2.spend(now)
    # two windows later nothing is left of it
    now += 2 * WINDOW_US
    assert sum(b1.spend(now) for _ in range(10)) == FLOOR


# ------------------------------------------------------------------ strategies
def states(n: int, nslots: int = 3) -> tuple[list[DeploymentState], D.DeploymentTable, mmap.mmap]:
    t, m = area(nslots=nslots)
    assigned(t, *range(100, 100 + n))
    return [dep(t, 100 + i) for i in range(n)], t, m


def test_round_robin_takes_turns_and_skips_the_blocked():
    deps, _t, _m = states(3)
    rr = RoundRobin()
    assert [rr.pick(deps, [0, 1, 2], 0) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [rr.pick(deps, [0, 2], 0) for _ in range(4)] == [0, 2, 2, 0]


def test_weighted_shares_and_interleaves():
    deps, _t, _m = states(3)
    w = Weighted([5, 1, 1])
    picks = [w.pick(deps, [0, 1, 2], 0) for _ in range(7)]
    assert Counter(picks) == {0: 5, 1: 1, 2: 1}
    assert picks[:3] != [0, 0, 0]  # smooth: spread out, not a burst
    assert Counter(w.pick(deps, [1, 2], 0) for _ in range(10)) == {1: 5, 2: 5}


def test_least_outstanding_sums_every_worker():
    deps, t, _m = states(2, nslots=4)
    other = DeploymentState(t, deps[0].index, 2, 3, 10.0, 5.0)  # another worker's handle
    for _ in range(3):
        other.begin(retry=False, hedge=False)
    deps[1].begin(retry=False, hedge=False)
    lo = LeastOutstanding()
    assert {lo.pick(deps, [0, 1], 0) for _ in range(4)} == {1}
    deps[1].begin(retry=False, hedge=False)
    deps[1].begin(retry=False, hedge=False)
    deps[1].begin(retry=False, hedge=False)
    assert {lo.pick(deps, [0, 1], 0) for _ in range(4)} == {0}
    other.end()  # 2 and 4: still 0
    deps[1].end()
    deps[1].end()  # 2 and 2: ties take turns
    assert Counter(lo.pick(deps, [0, 1], 0) for _ in range(4)) == {0: 2, 1: 2}


def test_lowest_latency_measures_first_then_prefers_the_fastest():
    deps, _t, _m = states(2)
    ll = LowestLatency()
    now = 100 * S
    first = ll.pick(deps, [0, 1], now)
    deps[first].measured(50_000, now)
    assert ll.pick(deps, [0, 1], now) == 1 - first  # the unmeasured one next
    deps[1 - first].measured(5_000, now)
    assert {ll.pick(deps, [0, 1], now + 1) for _ in range(5)} == {1 - first}
    # the fast one keeps being measured; the slow one's figure goes stale: measured again
    deps[1 - first].measured(5_000, now + STALE_US)
    assert {ll.pick(deps, [0, 1], now + STALE_US + 1) for _ in range(2)} == {first}


def test_unknown_strategy():
    with pytest.raises(ValueError, match="least_outstanding"):
        make_strategy("fastest", [1])


def test_a_process_killed_holding_the_lock_is_recovered():
    t, _m = area()
    assigned(t, 61)
    d = dep(t, 61, failures=1)
    pid = os.fork()
    if pid == 0:
        t.lock()
        os._exit(0)  # dies holding it
    os.waitpid(pid, 0)
    d.failure(0)  # takes the lock: recovered, not blocked for good
    assert t.w[D.RH_RECOVERED] == 1 and t.w[d.b + D.R_BR_STATE] == D.OPEN
    assert t.area_figures()["recovered"] == 1
