"""Windowed figures: the per-second ring in every slot (layout in layout.py).

Write side, in the worker (`Meter`):
- the request path adds 1 to the route's coarse latency bucket in the current
  cell (and to its status class unless 2xx) at `meter.cur + route offset`, an
  offset the tick precomputes (HttpConnection._account);
- `Meter.tick`, run by the worker's tick, closes the current cell once a second:
  it samples the gauges into it, adds it into CUM and zeroes and stamps the
  next cell, under the slot's seqlock;
- handlers record tokens and finished requests per model with `Meter.tokens`
  and `Meter.model_request`.

Read side (`read_since`, `read_cells`, `Figures`): any process copies the
rings and sums them (stats/snapshot.py). `fold_window`: the master folds a
dead worker's ring into the retired slot.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from operator import add
from time import monotonic
from typing import Any

from . import layout as L
from .seqlock import read_consistent

_RW, _MW = L.ROUTE_WORDS, L.MODEL_WORDS
_BOUNDS = L.BUCKET_BOUNDS_US
_OTHER_MODEL = L.C_MODELS - L.C_ROUTES  # model 0's block, relative to Meter.cur
_CB0 = L.CBUCKET_BOUNDS_US[0]  # the first coarse bucket's upper bound, in µs
_ZERO_CELL = memoryview(bytes(L.CELL_WORDS * 8)).cast("Q")


class Meter:
    """One worker's writer of the ring in its own slot.

    `cur` is the slot-relative offset of the current cell's route section: the
    request path adds to `slot[cur + route * ROUTE_WORDS + ...]`.
    """

    __slots__ = ("slot", "cur", "stamp", "models", "model_names", "_model_off", "_clock")

    def __init__(self, slot: memoryview, model_names: list[str],
                 now: float | None = None, clock: Any = time.time) -> None:
        self.slot = slot
        self._clock = clock
        # Model 0 is "other"; configured models get 1.. in config order.
        self.model_names = ["other", *model_names[:L.MAX_MODELS - 1]]
        self.models = {name: i for i, name in enumerate(self.model_names) if i}
        # each model's block relative to `cur`, so a model's figures are one add away
        self._model_off = {name: _OTHER_MODEL + i * _MW for name, i in self.models.items()}
        sec = int(clock() if now is None else now)
        base = L.ring_cell(sec)
        self._zero(base)
        slot[base + L.C_STAMP] = sec
        slot[L.S_WIN_FOLDED] = 0
        slot[L.S_WIN_CUR] = sec
        self.stamp = sec
        self.cur = base + L.C_ROUTES

    def _zero(self, base: int) -> None:
        s = self.slot
        s[base:base + L.CELL_WORDS] = _ZERO_CELL

    def tick(self, now: float | None = None) -> None:
        """Close the current cell if its second is over (the worker's tick calls this)."""
        sec = int(self._clock() if now is None else now)
        if sec <= self.stamp:
            return  # same second, or the clock stepped back: keep counting here
        s = self.slot
        old = L.ring_cell(self.stamp)
        new = L.ring_cell(sec)
        s[L.S_WIN_SEQ] += 1  # odd: readers retry
        try:
            s[old + L.C_CONNECTIONS] = s[L.S_ACTIVE_CONNECTIONS]
            s[old + L.C_STREAMS] = s[L.S_STREAMS_ACTIVE]
            a, b = L.S_CUM + L.C_ROUTES, L.S_CUM + L.CELL_WORDS
            s[a:b] = _words(map(add, s[a:b], s[old + L.C_ROUTES:old + L.CELL_WORDS]))
            s[L.S_WIN_FOLDED] = self.stamp
            self._zero(new)
            s[new + L.C_STAMP] = sec
            s[L.S_WIN_CUR] = sec
            self.stamp = sec
            self.cur = new + L.C_ROUTES
        finally:
            s[L.S_WIN_SEQ] += 1

    def count_response(self, route: int, status: int, us: int) -> None:
        """What the connection does inline for each response (worker/connection.py),
        as a method for other writers: the route's bucket and status class in
        this second's cell. Does not touch the since-start slot counters."""
        c = self.cur + route * _RW
        s = self.slot
        s[c + (bisect_right(_BOUNDS, us) >> 1)] += 1
        if status // 100 != 2:
            s[c + L.RB_CLASS + status // 100] += 1

    # ------------------------------------------------------------ per-model API
    def model_instant(self, model: str | None, tokens_in: int, tokens_out: int) -> None:
        """model_request() for an answer the provider gave at once (no model time:
        the first latency bucket), without reading the clock."""
        s = self.slot
        base = self.cur + self._model_off.get(model, _OTHER_MODEL)
        s[base] += 1
        s[base + L.MB_TOKENS_IN] += tokens_in
        s[base + L.MB_TOKENS_OUT] += tokens_out

    def tokens(self, model: str | None, tokens_in: int = 0, tokens_out: int = 0) -> None:
        """Count tokens for `model` now, for a request still running (a stream's
        prompt, at its start). The model's figures only: the caller counts the
        slot's totals (S_TOKENS_IN/OUT), as the pipeline does."""
        s = self.slot
        base = self.cur + self._model_off.get(model, _OTHER_MODEL)
        if tokens_in:
            s[base + L.MB_TOKENS_IN] += tokens_in
        if tokens_out:
            s[base + L.MB_TOKENS_OUT] += tokens_out

    def model_request(self, model: str | None, started: float, tokens_in: int = 0,
                      tokens_out: int = 0, error: bool = False) -> None:
        """Count one finished request for `model`, with its tokens not counted yet
        (the model's figures only, like tokens()); `started` is its
        time.monotonic() at the start. Call it before the last bytes of the
        response are written, so a client sees it in any later /stats."""
        us = int((monotonic() - started) * 1e6)
        s = self.slot
        base = self.cur + self._model_off.get(model, _OTHER_MODEL)
        # the coarse bucket (also the request count); an instant answer needs no search
        s[base + (0 if us < _CB0 else bisect_right(_BOUNDS, us) >> 1)] += 1
        if tokens_in:
            s[base + L.MB_TOKENS_IN] += tokens_in
        if tokens_out:
            s[base + L.MB_TOKENS_OUT] += tokens_out
        if error:
            s[base + L.MB_ERRORS] += 1


def _words(values: Any) -> memoryview:
    """A 'Q' memoryview of `values`, assignable into a slice of the block."""
    return memoryview(array("Q", values))


def fold_window(src: memoryview, dst: memoryview, now: int) -> None:
    """Master, folding a dead worker's slot `src` into the retired slot `dst`:
    CUM gets everything the worker counted; its recent cells join the retired
    ring so the last minute keeps them. Caller holds the block's seqlock."""
    a, b = L.C_ROUTES, L.CELL_WORDS
    cur = L.ring_cell(src[L.S_WIN_CUR])
    ca, cb = L.S_CUM + a, L.S_CUM + b
    total = map(add, src[ca:cb], src[cur + a:cur + b]) if src[cur] == src[L.S_WIN_CUR] \
        and src[L.S_WIN_CUR] > src[L.S_WIN_FOLDED] else src[ca:cb]
    dst[ca:cb] = _words(map(add, dst[ca:cb], total))
    for i in range(L.RING_CELLS):
        base = L.S_RING + i * L.CELL_WORDS
        stamp = src[base]
        if not stamp or stamp < now - L.RING_CELLS + 2:
            continue
        d = L.ring_cell(stamp)
        have = dst[d]
        if have > stamp:
            continue  # the retired ring moved past this second already
        if have < stamp:
            dst[d:d + L.CELL_WORDS] = _ZERO_CELL
            dst[d] = stamp
        dst[d + 1:d + b] = _words(map(add, dst[d + 1:d + b], src[base + 1:base + b]))


# ---------------------------------------------------------------- read side
def read_since(s: memoryview, retired: bool, nroutes: int, nmodels: int) -> list[int]:
    """One slot's since-start vector: `nroutes` route blocks then `nmodels` model
    blocks of CUM, plus the current cell for a live slot (the retired slot's CUM
    holds everything). Retries while the worker closes a cell."""
    ra, rb = L.C_ROUTES, L.C_ROUTES + nroutes * _RW
    ma, mb = L.C_MODELS, L.C_MODELS + nmodels * _MW
    c = L.S_CUM

    def read() -> list[int]:
        since = s[c + ra:c + rb].tolist() + s[c + ma:c + mb].tolist()
        stamp = s[L.S_WIN_CUR]
        cur = L.ring_cell(stamp)
        if not retired and s[cur] == stamp and stamp > s[L.S_WIN_FOLDED]:
            since = list(map(add, since,
                             s[cur + ra:cur + rb].tolist() + s[cur + ma:cur + mb].tolist()))
        return since

    return read_consistent(s, L.S_WIN_SEQ, read)


def read_cells(s: memoryview, now: int, ranges: list[tuple[int, int]]
               ) -> dict[int, tuple[int, int, list[int]]]:
    """One slot's cells of the last minute (stamped now-61 .. now), each as
    (connections, streams, the cell-relative word `ranges` concatenated)."""
    oldest = now - L.WINDOW_SECONDS - 1

    def read() -> dict[int, tuple[int, int, list[int]]]:
        cells = {}
        for i in range(L.RING_CELLS):
            base = L.S_RING + i * L.CELL_WORDS
            stamp = s[base]
            if oldest <= stamp <= now:
                vec: list[int] = []
                for a, b in ranges:
                    vec += s[base + a:base + b].tolist()
                cells[stamp] = (s[base + L.C_CONNECTIONS], s[base + L.C_STREAMS], vec)
        return cells

    return read_consistent(s, L.S_WIN_SEQ, read)


def block_ranges(routes: list[int], models: list[int]) -> list[tuple[int, int]]:
    """Cell-relative word ranges of these route blocks then these model blocks,
    adjacent blocks merged (fewer slices to copy)."""
    spans = [(L.C_ROUTES + r * _RW, L.C_ROUTES + (r + 1) * _RW) for r in routes]
    spans += [(L.C_MODELS + m * _MW, L.C_MODELS + (m + 1) * _MW) for m in models]
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def percentile(hist: list[int], q: float, bounds: list[int]) -> float:
    """The q-quantile (0..1) of a bucket histogram, in microseconds, interpolated
    linearly inside the bucket it falls in."""
    total = sum(hist)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            lo = bounds[i - 1] if i > 0 else 0
            hi = bounds[i] if i < len(bounds) else bounds[-1] * 2
            return lo + (hi - lo) * ((rank - seen) / n)
        seen += n
    return float(bounds[-1])


def vsum(vectors: list[list[int]], width: int) -> list[int]:
    """Element-wise sum of equal-length vectors (`width` long when there are none)."""
    if not vectors:
        return [0] * width
    if len(vectors) == 1:
        return list(vectors[0])
    return list(map(sum, zip(*vectors, strict=True)))


class Figures:
    """Counts and a coarse histogram, with the derived rate and percentiles."""

    __slots__ = ("hist", "count", "status")

    def __init__(self, hist: list[int], status: list[int] | None = None) -> None:
        self.hist = hist
        self.count = sum(hist)
        self.status = status  # 1xx..5xx, for routes

    def quantile_ms(self, q: float) -> float:
        return round(percentile(self.hist, q, L.CBUCKET_BOUNDS_US) / 1000.0, 3)

    def latency_ms(self) -> dict[str, float]:
        return {"p50": self.quantile_ms(0.5), "p90": self.quantile_ms(0.9),
                "p99": self.quantile_ms(0.99)}


def route_block(vec: list[int], r: int) -> list[int]:
    return vec[r * _RW:(r + 1) * _RW]


def model_block(vec: list[int], nroutes: int, m: int) -> list[int]:
    a = nroutes * _RW + m * _MW
    return vec[a:a + _MW]


def total_hist(vec: list[int], routes: range | list[int]) -> list[int]:
    """The coarse histograms of `routes` added: every response of the vector when
    `routes` holds every route with a count."""
    return vsum([vec[r * _RW:r * _RW + L.N_CBUCKETS] for r in routes], L.N_CBUCKETS)
