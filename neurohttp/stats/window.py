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

import logging
import time
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from operator import add
from time import monotonic
from typing import Any

from . import layout as L
from .seqlock import read_consistent

log = logging.getLogger("neurohttp")

_RW, _MW = L.ROUTE_WORDS, L.MODEL_WORDS
_BOUNDS = L.BUCKET_BOUNDS_US
_CB0 = L.CBUCKET_BOUNDS_US[0]  # the first coarse bucket's upper bound, in µs


def _zeros(n: int) -> memoryview:
    return memoryview(bytes(n * 8)).cast("Q")


def _sum_ranges(geo: L.Geometry, nroutes: int, nmodels: int) -> list[tuple[int, int]]:
    """Cell-relative ranges that are summed (CUM, folds): the routes and models in use."""
    return [(L.C_ROUTES, L.C_ROUTES + nroutes * _RW),
            (geo.c_models, geo.c_models + nmodels * _MW)]


class Meter:
    """One worker's writer of the ring in its own slot.

    `cur` is the slot-relative offset of the current cell's route section: the
    request path adds to `slot[cur + route * ROUTE_WORDS + ...]`. The meter
    zeroes and sums only the routes of `route_names` (the App's list: it may
    grow) and the models it knows, and records how many in the slot
    (S_WIN_ROUTES, S_WIN_MODELS), so the pages of the room beyond are never
    touched.
    """

    __slots__ = ("slot", "cur", "stamp", "models", "model_names", "geo", "_route_names",
                 "_model_off", "_other", "_clock", "_zero_cell")

    def __init__(self, slot: memoryview, model_names: list[str], geometry: L.Geometry,
                 route_names: Sequence[str] | None = None,
                 now: float | None = None, clock: Any = time.time) -> None:
        self.slot = slot
        self.geo = geo = geometry
        self._clock = clock
        self._route_names = route_names
        # Model 0 is "other"; configured models get 1.. in config order.
        room = geo.models - 1
        if len(model_names) > room:
            log.error("models %s are counted as 'other' in the stats: the stats block has "
                      "room for %d models (sized at start from the config); raise "
                      "[stats] max_models and restart", ", ".join(model_names[room:]), room)
        self.model_names = ["other", *model_names[:room]]
        self.models = {name: i for i, name in enumerate(self.model_names) if i}
        # each model's block relative to `cur`, so a model's figures are one add away
        self._other = geo.c_models - L.C_ROUTES  # model 0's block
        self._model_off: dict[str | None, int] = {
            name: self._other + i * _MW for name, i in self.models.items()}
        self._zero_cell = _zeros(geo.cell_words)
        sec = int(clock() if now is None else now)
        self._record_widths()
        base = geo.ring_cell(sec)
        self._zero(base)
        slot[base + L.C_STAMP] = sec
        slot[L.S_WIN_FOLDED] = 0
        slot[L.S_WIN_CUR] = sec
        self.stamp = sec
        self.cur = base + L.C_ROUTES

    def _record_widths(self) -> None:
        names = self._route_names
        n = self.geo.routes if names is None else min(len(names), self.geo.routes)
        s = self.slot
        if s[L.S_WIN_ROUTES] < n:  # never shrinks: what was counted stays readable
            s[L.S_WIN_ROUTES] = n
        s[L.S_WIN_MODELS] = len(self.model_names)

    def _zero(self, base: int) -> None:
        s = self.slot
        z = self._zero_cell
        for a, b in self.geo.cell_spans(base, s[L.S_WIN_ROUTES], s[L.S_WIN_MODELS]):
            s[a:b] = z[:b - a]

    def tick(self, now: float | None = None) -> None:
        """Close the current cell if its second is over (the worker's tick calls this)."""
        sec = int(self._clock() if now is None else now)
        self._record_widths()  # routes registered since (the first tick: all of them)
        if sec <= self.stamp:
            return  # same second, or the clock stepped back: keep counting here
        s = self.slot
        geo = self.geo
        old = geo.ring_cell(self.stamp)
        new = geo.ring_cell(sec)
        cum = L.S_CUM
        s[L.S_WIN_SEQ] += 1  # odd: readers retry
        try:
            s[old + L.C_CONNECTIONS] = s[L.S_ACTIVE_CONNECTIONS]
            s[old + L.C_STREAMS] = s[L.S_STREAMS_ACTIVE]
            for a, b in _sum_ranges(geo, s[L.S_WIN_ROUTES], s[L.S_WIN_MODELS]):
                s[cum + a:cum + b] = _words(map(add, s[cum + a:cum + b], s[old + a:old + b]))
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
        base = self.cur + self._model_off.get(model, self._other)
        s[base] += 1
        s[base + L.MB_TOKENS_IN] += tokens_in
        s[base + L.MB_TOKENS_OUT] += tokens_out

    def tokens(self, model: str | None, tokens_in: int = 0, tokens_out: int = 0) -> None:
        """Count tokens for `model` now, for a request still running (a stream's
        prompt, at its start). The model's figures only: the caller counts the
        slot's totals (S_TOKENS_IN/OUT), as the pipeline does."""
        s = self.slot
        base = self.cur + self._model_off.get(model, self._other)
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
        base = self.cur + self._model_off.get(model, self._other)
        # the coarse bucket (also the request count); an instant answer needs no search
        s[base + (0 if us < _CB0 else bisect_right(_BOUNDS, us) >> 1)] += 1
        if tokens_in:
            s[base + L.MB_TOKENS_IN] += tokens_in
        if tokens_out:
            s[base + L.MB_TOKENS_OUT] += tokens_out
        if error:
            s[base + L.MB_ERRORS] += 1

    def model_attempt(self, model: str, first: str, started: float, ttfb: float | None,
                      tokens_in: int, tokens_out: int, error: bool) -> None:
        """model_request() of `model` and, when `ttfb` (seconds to the first
        event) is not None, one request of `first` with that latency: a
        gateway deployment's total and time to first byte in one call
        (gateway/figures.py)."""
        self.model_request(model, started, tokens_in, tokens_out, error)
        if ttfb is not None:
            us = int(ttfb * 1e6)
            self.slot[self.cur + self._model_off.get(first, self._other)
                      + (0 if us < _CB0 else bisect_right(_BOUNDS, us) >> 1)] += 1


def _words(values: Any) -> memoryview:
    """A 'Q' memoryview of `values`, assignable into a slice of the block."""
    return memoryview(array("Q", values))


def fold_window(src: memoryview, dst: memoryview, now: int, geo: L.Geometry) -> None:
    """Master, folding a dead worker's slot `src` into the retired slot `dst`
    (whose S_WIN_ROUTES/MODELS already cover src's): CUM gets everything the
    worker counted; its recent cells join the retired ring so the last minute
    keeps them. Reads and writes only the routes and models in use."""
    nr, nm = src[L.S_WIN_ROUTES], src[L.S_WIN_MODELS]
    sums = _sum_ranges(geo, nr, nm)
    cur_stamp = src[L.S_WIN_CUR]
    cur = geo.ring_cell(cur_stamp)
    open_cell = src[cur] == cur_stamp and cur_stamp > src[L.S_WIN_FOLDED]
    c = L.S_CUM
    for a, b in sums:
        total = map(add, src[c + a:c + b], src[cur + a:cur + b]) if open_cell \
            else src[c + a:c + b]
        dst[c + a:c + b] = _words(map(add, dst[c + a:c + b], total))
    dst_spans = (dst[L.S_WIN_ROUTES], dst[L.S_WIN_MODELS])
    for i in range(L.RING_CELLS):
        base = geo.s_ring + i * geo.cell_words
        stamp = src[base]
        if not stamp or stamp < now - L.RING_CELLS + 2:
            continue
        d = geo.ring_cell(stamp)
        have = dst[d]
        if have > stamp:
            continue  # the retired ring moved past this second already
        if have < stamp:
            for a, b in geo.cell_spans(d, *dst_spans):
                dst[a:b] = _zeros(b - a)
            dst[d] = stamp
        # the sampled gauges (words 1, 2) add up across workers too
        for a, b in [(1, L.C_ROUTES)] + sums:
            dst[d + a:d + b] = _words(map(add, dst[d + a:d + b], src[base + a:base + b]))


# ---------------------------------------------------------------- read side
def _pieces(ranges: list[tuple[int, int]], s: memoryview, geo: L.Geometry
            ) -> list[tuple[int, int, bool]]:
    """`ranges` (cell-relative) cut where the slot's writer stops (S_WIN_ROUTES,
    S_WIN_MODELS): (a, b, True) is read, (a, b, False) reads as zeros without
    touching the block (an untouched page read would be allocated)."""
    valid = _sum_ranges(geo, s[L.S_WIN_ROUTES], s[L.S_WIN_MODELS])
    out = []
    for a, b in ranges:
        cuts = sorted({a, b, *(x for v in valid for x in v if a < x < b)})
        for x, y in zip(cuts, cuts[1:], strict=False):
            out.append((x, y, any(va <= x and y <= vb for va, vb in valid)))
    return out


def _take(s: memoryview, base: int, pieces: list[tuple[int, int, bool]]) -> list[int]:
    vec: list[int] = []
    for a, b, ok in pieces:
        vec += s[base + a:base + b].tolist() if ok else [0] * (b - a)
    return vec


def read_since(s: memoryview, retired: bool, nroutes: int, nmodels: int,
               geo: L.Geometry) -> list[int]:
    """One slot's since-start vector: `nroutes` route blocks then `nmodels` model
    blocks of CUM, plus the current cell for a live slot (the retired slot's CUM
    holds everything). Retries while the worker closes a cell."""
    ranges = [(L.C_ROUTES, L.C_ROUTES + nroutes * _RW), (geo.c_models, geo.c_models + nmodels * _MW)]

    def read() -> list[int]:
        pieces = _pieces(ranges, s, geo)
        since = _take(s, L.S_CUM, pieces)
        stamp = s[L.S_WIN_CUR]
        cur = geo.ring_cell(stamp)
        if not retired and s[cur] == stamp and stamp > s[L.S_WIN_FOLDED]:
            since = list(map(add, since, _take(s, cur, pieces)))
        return since

    return read_consistent(s, L.S_WIN_SEQ, read)


def read_cells(s: memoryview, now: int, ranges: list[tuple[int, int]], geo: L.Geometry
               ) -> dict[int, tuple[int, int, list[int]]]:
    """One slot's cells of the last minute (stamped now-61 .. now), each as
    (connections, streams, the cell-relative word `ranges` concatenated)."""
    oldest = now - L.WINDOW_SECONDS - 1

    def read() -> dict[int, tuple[int, int, list[int]]]:
        pieces = _pieces(ranges, s, geo)
        cells = {}
        for i in range(L.RING_CELLS):
            base = geo.s_ring + i * geo.cell_words
            stamp = s[base]
            if oldest <= stamp <= now:
                cells[stamp] = (s[base + L.C_CONNECTIONS], s[base + L.C_STREAMS],
                                _take(s, base, pieces))
        return cells

    return read_consistent(s, L.S_WIN_SEQ, read)


def block_ranges(routes: list[int], models: list[int], geo: L.Geometry
                 ) -> list[tuple[int, int]]:
    """Cell-relative word ranges of these route blocks then these model blocks,
    adjacent blocks merged (fewer slices to copy)."""
    spans = [(L.C_ROUTES + r * _RW, L.C_ROUTES + (r + 1) * _RW) for r in routes]
    spans += [(geo.c_models + m * _MW, geo.c_models + (m + 1) * _MW) for m in models]
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
        self.status = status if status is not None else [0] * 5  # 1xx..5xx, for routes

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
