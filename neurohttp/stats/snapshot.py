"""Read every slot of the stats block into one consistent picture (for /stats)."""

from __future__ import annotations

import time
from typing import Any

from . import layout as L
from .block import StatsBlock

_STATE_NAMES = {L.STATE_STARTING: "starting", L.STATE_READY: "ready",
                L.STATE_DRAINING: "draining"}


def _copy(block: StatsBlock, words: int) -> tuple[list[int], list[list[int]]]:
    w = block.words
    sw = block.slot_words
    header = w[:L.HEADER_WORDS].tolist()
    slots = []
    for i in range(block.nslots):
        off = L.slot_offset(i, sw)
        slots.append(w[off:off + words].tolist())
    return header, slots


def copy_consistent(block: StatsBlock, words: int = L.HIST_END) -> tuple[list[int], list[list[int]]]:
    """Copy the header and the first `words` of every slot, retrying while the
    master is folding a slot (seqlock), so nothing is seen twice or missed."""
    w = block.words
    for _ in range(1000):
        seq = w[L.H_SEQ]
        if seq & 1:
            time.sleep(0)
            continue
        data = _copy(block, words)
        if w[L.H_SEQ] == seq:
            return data
    return _copy(block, words)  # a master stuck mid-fold: better slightly off than no answer


def percentile(hist: list[int], q: float) -> float:
    """The q-quantile (0..1) of a bucket histogram, in microseconds, interpolated."""
    total = sum(hist)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    bounds = L.BUCKET_BOUNDS_US
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            lo = bounds[i - 1] if i > 0 else 0
            hi = bounds[i] if i < len(bounds) else bounds[-1] * 2
            return lo + (hi - lo) * ((rank - seen) / n)
        seen += n
    return float(bounds[-1])


class Snapshot:
    """Totals (live slots plus the retired slot) and the per-worker rows."""

    def __init__(self, block: StatsBlock) -> None:
        self.header, self.slots = copy_consistent(block)
        self.live = [(i, s) for i, s in enumerate(self.slots)
                     if i and s[L.S_STATE] != L.STATE_FREE]
        retired = self.slots[0]
        self.totals = {k: retired[k] + sum(s[k] for _, s in self.live) for k in L.COUNTERS}
        for k in L.GAUGES:
            self.totals[k] = sum(s[k] for _, s in self.live)
        for k in L.MAXIMA:
            self.totals[k] = max([retired[k]] + [s[k] for _, s in self.live])
        self.hist = [retired[k] + sum(s[k] for _, s in self.live)
                     for k in range(L.S_HIST, L.HIST_END)]

    def __getitem__(self, k: int) -> int:
        return self.totals[k]


def stats_document(block: StatsBlock, now: float | None = None) -> dict[str, Any]:
    """The /stats JSON document."""
    now = time.time() if now is None else now
    snap = Snapshot(block)
    h = snap.header
    t = snap.totals
    started = h[L.H_STARTED]
    hist = snap.hist

    def ms(us: float) -> float:
        return round(us / 1000.0, 3)

    mono_ms = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000
    workers = []
    for i, s in snap.live:
        workers.append({
            "id": s[L.S_WORKER_ID],
            "slot": i,
            "pid": s[L.S_PID],
            "state": _STATE_NAMES.get(s[L.S_STATE], "unknown"),
            "age": max(0, int(now) - s[L.S_STARTED]),
            "heartbeat_ms_ago": max(0, mono_ms - s[L.S_HEARTBEAT]),
            "requests": s[L.S_REQUESTS],
            "responses": s[L.S_RESPONSES],
            "active_connections": s[L.S_ACTIVE_CONNECTIONS],
            "streams_active": s[L.S_STREAMS_ACTIVE],
        })
    return {
        "requests": t[L.S_REQUESTS],
        "responses": t[L.S_RESPONSES],
        "uptime": max(0, int(now) - started),
        "active_connections": t[L.S_ACTIVE_CONNECTIONS],
        "timestamp": int(now),
        "status": {f"{c}xx": t[L.S_STATUS + c] for c in range(1, 6)},
        "latency_ms": {
            "p50": ms(percentile(hist, 0.50)),
            "p90": ms(percentile(hist, 0.90)),
            "p99": ms(percentile(hist, 0.99)),
            "max": ms(t[L.S_LATENCY_MAX_US]),
            "mean": ms(t[L.S_LATENCY_SUM_US] / t[L.S_RESPONSES]) if t[L.S_RESPONSES] else 0.0,
        },
        "bytes_in": t[L.S_BYTES_IN],
        "bytes_out": t[L.S_BYTES_OUT],
        "tokens_in": t[L.S_TOKENS_IN],
        "tokens_out": t[L.S_TOKENS_OUT],
        "streams_active": t[L.S_STREAMS_ACTIVE],
        "streams_total": t[L.S_STREAMS],
        "streams_cancelled": t[L.S_STREAMS_CANCELLED],
        "connections_total": t[L.S_CONNECTIONS],
        "errors_parse": t[L.S_ERRORS_PARSE],
        "workers": workers,
        "master": {
            "pid": h[L.H_MASTER_PID],
            "started": started,
            "workers": h[L.H_WORKERS],
            "reloads": h[L.H_RELOADS],
            "restarts": h[L.H_RESTARTS],
            "generation": h[L.H_GENERATION],
        },
    }
