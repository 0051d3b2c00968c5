"""Per-deployment figures, summed across workers and kept across worker deaths.

Each deployment has two entries in the stats block's per-model blocks
(stats/window.py): "<model>#<i>" counts every attempt with its total latency,
errors, prompt and completion tokens, and "<model>#<i> ttfb" the time to the
first event. So they cost what a model's figures cost (a few adds in the
worker's own slot, no lock), the master folds them when a worker dies, and
readers get the since-start and last-minute figures with percentiles like a
model's. Errors by kind ("connect", "first_byte_timeout", "status_429", ...)
are rare: they are exact counters in the shared named table (neurohttp/shared/),
one locked add per error.

Both are keyed by the deployment, not by its place in the list: the pair of
model indexes is the one the master gave the deployment's router record
(shared/deployments.py R_FIG; from the top of the block's model room down, the
public models taking it from the bottom), and the error counters are named by
its identity (the fingerprint of its table). A reload that reorders or inserts
deployments leaves each one's figures with it; a pair given to a new
deployment is cleared first (StatsBlock.clear_models).

The room they take is counted in the block's size (stats/sizing.py: two model
indexes per deployment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..upstream import ErrorKind

log = logging.getLogger("neurohttp")

# error reasons that have a counter of their own (others count as "other")
ERROR_REASONS = (*(k.value for k in ErrorKind if k is not ErrorKind.STATUS), "status_429",
                 "status_4xx", "status_5xx", "bad_event", "no_key", "other")


def error_key(label: str, reason: str) -> str:
    return f"gw-err|{label}|{reason}"


def error_label(dep: Any) -> str:
    """What a deployment's error counters are named by: its identity."""
    return f"{dep.model}@{dep.identity:016x}"


def _reason_slot(reason: str) -> str:
    if reason.startswith("status_") and reason != "status_429":
        return "status_4xx" if reason.startswith("status_4") else "status_5xx"
    return reason if reason in ERROR_REASONS else "other"


def stat_names(public: list[str], deployments: list[Any], table: Any, geo: Any) -> list[str]:
    """The Meter's model names (after "other"): the `public` models in config
    order, then each deployment's two entries at the indexes of its figure
    pair (its record's in router `table`); "" where nothing is counted."""
    names = list(public)
    for dep in deployments:
        pair = table.figure_pair(table.find(dep.identity)) if table is not None else -1
        m, t = geo.deployment_models(pair) if pair >= 0 else (0, 0)
        if m <= len(public):
            log.error("deployment %s (%s) is not counted in the stats: the stats block's "
                      "model room is full (sized at start from the config); raise "
                      "[stats] max_models and restart", dep.label, dep.origin)
            continue
        if len(names) < t:
            names += [""] * (t - len(names))
        names[m - 1], names[t - 1] = dep.label, dep.label + " ttfb"
    return names


class GatewayFigures:
    """The worker's writers: its Meter (per-model blocks) and the named table."""

    __slots__ = ("meter", "named")

    def __init__(self, meter: Any, named: Any) -> None:
        self.meter = meter
        self.named = named


class DeploymentFigures:
    __slots__ = ("label", "total", "ttfb", "sink")

    def __init__(self, dep: Any, sink: GatewayFigures | None) -> None:
        self.label = error_label(dep)
        self.total = dep.label
        self.ttfb = dep.label + " ttfb"
        self.sink = sink

    def attempt(self, started: float, ttfb: float | None, fail: Any,
                usage: dict[str, Any] | None) -> None:
        """One attempt ended (`started`: its monotonic start; `ttfb`: seconds to
        its first event, None if none came; `fail`: its AttemptError or None;
        `usage`: the upstream's usage object)."""
        sink = self.sink
        if sink is None:
            return
        meter = sink.meter
        tin = tout = 0
        if usage.__class__ is dict:
            p = usage.get("prompt_tokens")
            c = usage.get("completion_tokens")
            tin = p if type(p) is int and p > 0 else 0
            tout = c if type(c) is int and c > 0 else 0
        if meter is not None and self.total in meter.models:  # (not past the block's room)
            meter.model_attempt(self.total, self.ttfb, started, ttfb, tin, tout,
                                fail is not None)
        if fail is not None and sink.named is not None:
            try:
                sink.named.add(error_key(self.label, _reason_slot(fail.reason)))
            except Exception:  # a full table must not fail the request
                pass


def _blk_doc(blk: list[int], ttfb: list[int]) -> dict[str, Any]:
    from ..stats import layout as L
    from ..stats.window import Figures
    total = Figures(blk[:L.N_CBUCKETS])
    first = Figures(ttfb[:L.N_CBUCKETS])
    return {"requests": total.count, "errors": blk[L.MB_ERRORS],
            "tokens_in": blk[L.MB_TOKENS_IN], "tokens_out": blk[L.MB_TOKENS_OUT],
            "ttfb_ms": first.latency_ms(), "latency_ms": total.latency_ms()}


def deployments_section(block: Any, model_names: list[str], deployments: list[Any],
                        named: Any) -> Callable[[], dict[str, Any]]:
    """The reader of /stats "deployments" (StatsReader.add_section): per
    deployment, since start and over the last minute, attempts, errors (and
    by kind, since start), prompt and completion tokens the upstream reported,
    time to first event and total latency percentiles. `model_names`: the
    Meter's whole list (public models, then the deployments' entries)."""
    from ..stats import layout as L
    from ..stats.snapshot import Snapshot
    index = {name: i for i, name in enumerate(model_names)}

    def read() -> dict[str, Any]:
        snap = Snapshot(block, ["other"], model_names)
        span = snap.span(int(block.words[L.H_STARTED]))
        out: dict[str, Any] = {}
        for dep in deployments:
            m, t = index.get(dep.label), index.get(dep.label + " ttfb")
            if m is None or t is None:
                continue  # past the block's room (logged by the Meter)
            doc = _blk_doc(snap.model(m, False), snap.model(t, False))
            by_kind = {}
            if named is not None:
                for reason in ERROR_REASONS:
                    n = named.get(error_key(error_label(dep), reason))
                    if n:
                        by_kind[reason] = n
            window = _blk_doc(snap.model(m, True), snap.model(t, True))
            window["rps"] = round(window["requests"] / span, 3)
            out[dep.label] = {"model": dep.model, "index": dep.index, "origin": dep.origin,
                              "upstream_model": dep.upstream, **doc, "errors_by_kind": by_kind,
                              "window": window}
        return out

    return read
