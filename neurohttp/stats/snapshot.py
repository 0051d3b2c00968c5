"""Read every slot of the stats block into one consistent picture (/stats, /metrics, top)."""

from __future__ import annotations

import time
from typing import Any

from . import layout as L
from .block import StatsBlock
from .procs import process_figures
from .seqlock import read_consistent
from .window import (
    Figures,
    block_ranges,
    model_block,
    read_cells,
    read_since,
    route_block,
    total_hist,
    vsum,
)
from .window import percentile as _percentile

_STATE_NAMES = {L.STATE_STARTING: "starting", L.STATE_READY: "ready",
                L.STATE_DRAINING: "draining"}


def _copy(block: StatsBlock, words: int) -> tuple[list[int], list[list[int]]]:
    w = block.words
    sw = block.slot_words
    header = w[:L.HEADER_WORDS].tolist()
    # Free slots are all zero (the fold clears them): copy only the retired and used ones.
    start = L.SLOTS_OFF + L.S_STATE
    states = w[start:start + block.nslots * sw:sw].tolist()
    free = [0] * words
    slots = []
    for i in range(block.nslots):
        if i and states[i] == L.STATE_FREE:
            slots.append(free)
        else:
            off = L.slot_offset(i, sw)
            slots.append(w[off:off + words].tolist())
    return header, slots


def copy_consistent(block: StatsBlock, words: int = L.HIST_END) -> tuple[list[int], list[list[int]]]:
    """Copy the header and the first `words` of every slot, retrying while the
    master is folding a slot (seqlock), so nothing is seen twice or missed."""
    return read_consistent(block.words, L.H_SEQ, lambda: _copy(block, words))


class _Raw:
    """What one pass over the block copied (see _read)."""

    def __init__(self) -> None:
        self.header: list[int] = []
        self.slots: list[list[int]] = []
        self.since: list[int] = []          # since-start vector, all slots added
        self.routes: list[int] = []         # route indexes with any response
        self.models: list[int] = []         # model indexes with any figure
        self.cells: dict[int, dict[int, tuple[int, int, list[int]]]] = {}  # slot -> cells


def _read(block: StatsBlock, now: int, nroutes: int, nmodels: int) -> _Raw:
    """Header, the counters of every slot and the rings of the live and retired
    slots, from one pass that no fold by the master interleaved with. Cells are
    copied only for the routes and models that have counted anything."""
    width = nroutes * L.ROUTE_WORDS + nmodels * L.MODEL_WORDS
    geo = block.geometry

    def read() -> _Raw:
        raw = _Raw()
        raw.header, raw.slots = _copy(block, L.HIST_END)
        used = [i for i, s in enumerate(raw.slots) if i == 0 or s[L.S_STATE] != L.STATE_FREE]
        since = raw.since = vsum([read_since(block.slot(i), i == 0, nroutes, nmodels, geo)
                                  for i in used], width)
        raw.routes = [r for r in range(nroutes) if any(route_block(since, r))]
        raw.models = [m for m in range(nmodels) if any(model_block(since, nroutes, m))]
        ranges = block_ranges(raw.routes, raw.models, geo)
        raw.cells = {i: read_cells(block.slot(i), now, ranges, geo) for i in used}
        return raw

    return read_consistent(block.words, L.H_SEQ, read)


def percentile(hist: list[int], q: float) -> float:
    """The q-quantile (0..1) of a fine bucket histogram, in microseconds, interpolated."""
    return _percentile(hist, q, L.BUCKET_BOUNDS_US)


def _ms(us: float) -> float:
    return round(us / 1000.0, 3)


def _fine_latency(hist: list[int]) -> dict[str, float]:
    """p50/p90/p99 in ms of a fine (since-start) histogram."""
    return {"p50": _ms(percentile(hist, 0.50)), "p90": _ms(percentile(hist, 0.90)),
            "p99": _ms(percentile(hist, 0.99))}


class Snapshot:
    """Totals (live slots plus the retired slot), the per-worker rows and the
    windowed figures, read at one moment.

    `routes` and `models` name the route and model indexes (index 0: "other"),
    as the reading worker's App and Meter assigned them.
    """

    def __init__(self, block: StatsBlock, routes: list[str] | None = None,
                 models: list[str] | None = None, now: float | None = None,
                 since: int | None = None) -> None:
        self.now = time.time() if now is None else now
        sec = self.sec = int(self.now)
        geo = block.geometry
        self.route_names = list(routes or ["other"])[:geo.routes]
        self.model_names = list(models or ["other"])[:geo.models]
        nr, nm = len(self.route_names), len(self.model_names)
        raw = _read(block, sec, nr, nm)
        self.header, self.slots = raw.header, raw.slots
        self.state = block.state.figures()  # each word alone is exact: no seqlock
        for slot in self.slots:
            # Workers count a response once, in its status class; the total is their sum.
            slot[L.S_RESPONSES] = sum(slot[L.S_STATUS + 1:L.S_STATUS + 6])
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

        # ---- windowed figures: the closed seconds sec-60 .. sec-1 (from `since`
        # if it is later: a plugin's interval, e.g. logstats')
        self.window_seconds = L.WINDOW_SECONDS
        first = sec - L.WINDOW_SECONDS if since is None else max(since, sec - L.WINDOW_SECONDS)
        self.stamps = list(range(first, sec))
        n = len(self.stamps)
        self.conn_series = [0] * n
        self.stream_series = [0] * n
        self.series_tokens_out = [0] * n
        per_second: list[list[list[int]]] = [[] for _ in range(n)]  # total histograms
        self.slot_window: dict[int, tuple[Figures, int]] = {}
        slot_vecs = []
        # cell vectors hold only the used routes' blocks, then the used models' blocks
        self.rpos = {r: k * L.ROUTE_WORDS for k, r in enumerate(raw.routes)}
        mbase = len(raw.routes) * L.ROUTE_WORDS
        self.mpos = {m: mbase + k * L.MODEL_WORDS for k, m in enumerate(raw.models)}
        width = mbase + len(raw.models) * L.MODEL_WORDS
        used = range(len(raw.routes))
        tok_out = [p + L.MB_TOKENS_OUT for p in self.mpos.values()]
        for i, cells in raw.cells.items():
            mine = []
            last = 0
            for stamp, (conns, streams, vec) in cells.items():
                if not first <= stamp < sec:
                    continue
                k = stamp - first
                self.conn_series[k] += conns
                self.stream_series[k] += streams
                if not any(vec):
                    continue  # an idle second: nothing to add
                mine.append(vec)
                th = total_hist(vec, used)
                per_second[k].append(th)
                self.series_tokens_out[k] += sum(vec[j] for j in tok_out)
                if stamp == sec - 1:
                    last = sum(th)
            slot_vec = vsum(mine, width)
            slot_vecs.append(slot_vec)
            if i:
                self.slot_window[i] = (Figures(total_hist(slot_vec, used)), last)
        self.series_hist = [vsum(h, L.N_CBUCKETS) for h in per_second]
        self.since_vec = raw.since
        self.window_vec = vsum(slot_vecs, width)
        self.nroutes, self.nmodels = nr, nm

    def __getitem__(self, k: int) -> int:
        return self.totals[k]

    # ------------------------------------------------------------ derived figures
    def span(self, started: int) -> int:
        """Seconds of the window that something started at `started` was up for."""
        return max(1, min(self.window_seconds, self.sec - started))

    def route(self, r: int, window: bool) -> Figures:
        if window:
            p = self.rpos.get(r)
            blk = [0] * L.ROUTE_WORDS if p is None else self.window_vec[p:p + L.ROUTE_WORDS]
        else:
            blk = route_block(self.since_vec, r)
        hist = blk[:L.N_CBUCKETS]
        status = blk[L.RB_CLASS + 1:L.RB_CLASS + 6]
        status[1] = sum(hist) - sum(status)  # 2xx is not counted directly (see layout.py)
        return Figures(hist, status)

    def model(self, m: int, window: bool) -> list[int]:
        if window:
            p = self.mpos.get(m)
            return [0] * L.MODEL_WORDS if p is None else self.window_vec[p:p + L.MODEL_WORDS]
        return model_block(self.since_vec, self.nroutes, m)

    def window_total(self) -> Figures:
        status = vsum([self.route(r, True).status for r in self.rpos], 5)
        return Figures(total_hist(self.window_vec, range(len(self.rpos))), status)


def _status(counts: list[int]) -> dict[str, int]:
    return {f"{c + 1}xx": counts[c] for c in range(5)}


def _model_doc(blk: list[int]) -> dict[str, Any]:
    f = Figures(blk[:L.N_CBUCKETS])
    return {"requests": f.count, "errors": blk[L.MB_ERRORS],
            "tokens_in": blk[L.MB_TOKENS_IN], "tokens_out": blk[L.MB_TOKENS_OUT],
            "latency_ms": f.latency_ms()}


def stats_document(block: StatsBlock | Snapshot, now: float | None = None,
                   routes: list[str] | None = None, models: list[str] | None = None,
                   processes: bool = True) -> dict[str, Any]:
    """The /stats JSON document (from a block, or from a Snapshot already taken)."""
    from .. import __version__
    snap = block if isinstance(block, Snapshot) else Snapshot(block, routes, models, now)
    now = snap.now
    h = snap.header
    t = snap.totals
    started = h[L.H_STARTED]
    hist = snap.hist
    span = snap.span(started)

    mono_ms = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000
    workers = []
    for i, s in snap.live:
        fig, last = snap.slot_window.get(i, (Figures([0] * L.N_CBUCKETS), 0))
        row = {
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
            "latency_ms": _fine_latency(s[L.S_HIST:L.HIST_END]),
            "window": {"requests": fig.count,
                       "rps": round(fig.count / snap.span(s[L.S_STARTED]), 3),
                       "rps_last": last, "latency_ms": fig.latency_ms()},
        }
        if processes:
            row["process"] = process_figures(s[L.S_PID])
        workers.append(row)

    win = snap.window_total()
    tok_in = sum(snap.model(m, True)[L.MB_TOKENS_IN] for m in range(snap.nmodels))
    tok_out = sum(snap.model(m, True)[L.MB_TOKENS_OUT] for m in range(snap.nmodels))
    series_figs = [Figures(hh) for hh in snap.series_hist]
    window = {
        "seconds": snap.window_seconds,
        "span": span,
        "requests": win.count,
        "rps": round(win.count / span, 3),
        "status": _status(win.status),
        "latency_ms": win.latency_ms(),
        "tokens_in": tok_in,
        "tokens_out": tok_out,
        "tokens_out_per_s": round(tok_out / span, 3),
        "series": {
            "t": snap.stamps,
            "rps": [f.count for f in series_figs],
            "p50": [f.quantile_ms(0.5) for f in series_figs],
            "p90": [f.quantile_ms(0.9) for f in series_figs],
            "p99": [f.quantile_ms(0.99) for f in series_figs],
            "tokens_out": snap.series_tokens_out,
            "active_connections": snap.conn_series,
            "streams_active": snap.stream_series,
        },
    }
    routes_doc = {}
    for r, name in enumerate(snap.route_names):
        since_r, last_r = snap.route(r, False), snap.route(r, True)
        if r == 0 and not since_r.count:
            continue  # "other" only once something fell into it
        routes_doc[name] = {
            "requests": since_r.count, "status": _status(since_r.status),
            "latency_ms": since_r.latency_ms(),
            "window": {"requests": last_r.count, "rps": round(last_r.count / span, 3),
                       "status": _status(last_r.status), "latency_ms": last_r.latency_ms()},
        }
    models_doc = {}
    for m, name in enumerate(snap.model_names):
        since_m, last_m = snap.model(m, False), snap.model(m, True)
        if m == 0 and not any(since_m):
            continue
        doc = _model_doc(since_m)
        wdoc = _model_doc(last_m)
        wdoc["rps"] = round(wdoc["requests"] / span, 3)
        wdoc["tokens_out_per_s"] = round(last_m[L.MB_TOKENS_OUT] / span, 3)
        doc["window"] = wdoc
        models_doc[name] = doc
    master: dict[str, Any] = {
        "pid": h[L.H_MASTER_PID],
        "started": started,
        "workers": h[L.H_WORKERS],
        "reloads": h[L.H_RELOADS],
        "restarts": h[L.H_RESTARTS],
        "generation": h[L.H_GENERATION],
    }
    if processes:
        master["process"] = process_figures(h[L.H_MASTER_PID])
    return {
        "version": __version__,
        "requests": t[L.S_REQUESTS],
        "responses": t[L.S_RESPONSES],
        "uptime": max(0, int(now) - started),
        "active_connections": t[L.S_ACTIVE_CONNECTIONS],
        "timestamp": int(now),
        "status": {f"{c}xx": t[L.S_STATUS + c] for c in range(1, 6)},
        "latency_ms": {
            **_fine_latency(hist),
            "max": _ms(t[L.S_LATENCY_MAX_US]),
            "mean": _ms(t[L.S_LATENCY_SUM_US] / t[L.S_RESPONSES]) if t[L.S_RESPONSES] else 0.0,
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
        "window": window,
        "routes": routes_doc,
        "models": models_doc,
        "workers": workers,
        "master": master,
        "state": snap.state,
    }
