"""The /metrics document: Prometheus text format 0.0.4, written directly.

Built from the same Snapshot and /stats document as /stats, so the two agree.
The latency histogram's buckets are the shared-memory buckets (quarter-octave,
16 µs .. 67 s), cumulative as Prometheus wants them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import layout as L
from .snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LE = [f"{b / 1e6:.6g}" for b in L.BUCKET_BOUNDS_US] + ["+Inf"]
_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, Any] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Sequence[tuple[dict[str, Any] | None, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [(None, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def metrics_text(snap: Snapshot, doc: dict[str, Any]) -> str:
    """Render the snapshot (and its /stats document `doc`) as Prometheus text."""
    w = _Writer()
    t = snap.totals
    h = snap.header
    w.family("neurohttp_info", "gauge", "The server's version.", [({"version": doc["version"]}, 1)])
    w.one("neurohttp_start_time_seconds", "gauge", "Unix time the master started.",
          h[L.H_STARTED])
    w.one("neurohttp_uptime_seconds", "gauge", "Seconds since the master started.", doc["uptime"])
    w.one("neurohttp_workers", "gauge", "Live worker processes.", h[L.H_WORKERS])
    w.one("neurohttp_requests_parsed_total", "counter",
          "Request heads parsed (malformed ones included).", t[L.S_REQUESTS])
    w.one("neurohttp_responses_total", "counter", "Responses written.", t[L.S_RESPONSES])

    samples = []
    for name, r in doc["routes"].items():
        for cls, n in r["status"].items():
            samples.append(({"route": name, "status": cls}, n))
    w.family("neurohttp_http_requests_total", "counter",
             "Responses written, by route (\"other\": unmatched paths and protocol errors) "
             "and status class.", samples)

    hist = snap.hist
    lines = w.lines
    name = "neurohttp_request_duration_seconds"
    lines.append(f"# HELP {name} Time from the request's arrival to its response's last "
                 "bytes handed to the socket.")
    lines.append(f"# TYPE {name} histogram")
    acc = 0
    for le, n in zip(_LE, hist, strict=True):
        acc += n
        lines.append(f'{name}_bucket{{le="{le}"}} {acc}')
    lines.append(f"{name}_sum {_num(t[L.S_LATENCY_SUM_US] / 1e6)}")
    lines.append(f"{name}_count {acc}")
    w.one("neurohttp_request_duration_max_seconds", "gauge", "Slowest response since start.",
          t[L.S_LATENCY_MAX_US] / 1e6)

    w.one("neurohttp_active_connections", "gauge", "Open client connections.",
          t[L.S_ACTIVE_CONNECTIONS])
    w.one("neurohttp_connections_total", "counter", "Client connections accepted.",
          t[L.S_CONNECTIONS])
    w.one("neurohttp_streams_active", "gauge", "Streamed responses in progress.",
          t[L.S_STREAMS_ACTIVE])
    w.one("neurohttp_streams_total", "counter", "Streamed responses started.", t[L.S_STREAMS])
    w.one("neurohttp_streams_cancelled_total", "counter",
          "Streamed responses cut short (client gone or failure).", t[L.S_STREAMS_CANCELLED])
    w.family("neurohttp_tokens_total", "counter", "Tokens counted, prompt (in) and completion (out).",
             [({"direction": "in"}, t[L.S_TOKENS_IN]), ({"direction": "out"}, t[L.S_TOKENS_OUT])])
    w.one("neurohttp_bytes_received_total", "counter", "Bytes read from clients.", t[L.S_BYTES_IN])
    w.one("neurohttp_bytes_sent_total", "counter", "Bytes written to clients.", t[L.S_BYTES_OUT])
    w.one("neurohttp_worker_restarts_total", "counter",
          "Workers replaced after dying or hanging.", h[L.H_RESTARTS])
    w.one("neurohttp_reloads_total", "counter", "Configuration reloads.", h[L.H_RELOADS])
    state = snap.state
    w.family("neurohttp_state_keys", "gauge",
             "Keys held in the shared-state tables (named: from the config; open: IPs, ...).",
             [({"table": k}, v["used"]) for k, v in state.items()])
    w.family("neurohttp_state_capacity", "gauge", "Entries the shared-state tables can hold.",
             [({"table": k}, v["capacity"]) for k, v in state.items()])
    w.family("neurohttp_state_full_total", "counter",
             "Operations refused (as over their limit) because the table had no room for a new key.",
             [({"table": k}, v["full"]) for k, v in state.items()])
    w.family("neurohttp_state_lock_recoveries_total", "counter",
             "Times a process died holding a shared-state lock and the next one recovered it.",
             [({"table": k}, v["recovered"]) for k, v in state.items()])
    models = doc["models"]
    w.family("neurohttp_errors_total", "counter",
             "Errors by kind: protocol (malformed requests), client (4xx), server (5xx), "
             "model (failed model calls), stream_cancelled.",
             [({"kind": "protocol"}, t[L.S_ERRORS_PARSE]),
              ({"kind": "client"}, t[L.S_STATUS + 4]),
              ({"kind": "server"}, t[L.S_STATUS + 5]),
              ({"kind": "model"}, sum(m["errors"] for m in models.values())),
              ({"kind": "stream_cancelled"}, t[L.S_STREAMS_CANCELLED])])

    w.family("neurohttp_model_requests_total", "counter", "Finished requests by model.",
             [({"model": m}, v["requests"]) for m, v in models.items()])
    w.family("neurohttp_model_errors_total", "counter", "Failed requests by model.",
             [({"model": m}, v["errors"]) for m, v in models.items()])
    w.family("neurohttp_model_tokens_total", "counter", "Tokens by model and direction.",
             [({"model": m, "direction": d}, v[f"tokens_{d}"])
              for m, v in models.items() for d in ("in", "out")])

    win = doc["window"]
    w.one("neurohttp_window_requests_per_second", "gauge",
          f"Responses per second over the last {win['seconds']} s.", win["rps"])
    w.family("neurohttp_window_latency_seconds", "gauge",
             f"Latency quantiles over the last {win['seconds']} s.",
             [({"quantile": q}, win["latency_ms"][k] / 1000) for q, k in _QUANTILES])
    w.family("neurohttp_route_window_requests_per_second", "gauge",
             "Responses per second over the last minute, by route.",
             [({"route": n}, r["window"]["rps"]) for n, r in doc["routes"].items()])
    w.family("neurohttp_route_window_latency_seconds", "gauge",
             "Latency quantiles over the last minute, by route.",
             [({"route": n, "quantile": q}, r["window"]["latency_ms"][k] / 1000)
              for n, r in doc["routes"].items() for q, k in _QUANTILES])
    w.family("neurohttp_model_window_tokens_per_second", "gauge",
             "Completion tokens per second over the last minute, by model.",
             [({"model": m}, v["window"]["tokens_out_per_s"]) for m, v in models.items()])

    workers = doc["workers"]
    w.family("neurohttp_worker_responses_total", "counter", "Responses written, by worker.",
             [({"worker": x["id"]}, x["responses"]) for x in workers])
    w.family("neurohttp_worker_active_connections", "gauge", "Open connections, by worker.",
             [({"worker": x["id"]}, x["active_connections"]) for x in workers])
    w.family("neurohttp_worker_window_requests_per_second", "gauge",
             "Responses per second over the last minute, by worker.",
             [({"worker": x["id"]}, x["window"]["rps"]) for x in workers])

    procs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    master = doc["master"]
    if master.get("process"):
        procs.append(({"role": "master", "worker": "0", "pid": master["pid"]}, master["process"]))
    for x in workers:
        if x.get("process"):
            procs.append(({"role": "worker", "worker": x["id"], "pid": x["pid"]}, x["process"]))
    w.family("neurohttp_process_cpu_seconds_total", "counter",
             "CPU time (user + system) of the master and each worker.",
             [(lab, p["cpu_seconds"]) for lab, p in procs])
    w.family("neurohttp_process_resident_memory_bytes", "gauge",
             "Resident memory of the master and each worker.",
             [(lab, p["rss_bytes"]) for lab, p in procs])
    w.family("neurohttp_process_open_fds", "gauge",
             "Open file descriptors of the master and each worker.",
             [(lab, p["open_fds"]) for lab, p in procs])
    auth = doc.get("auth")
    if auth is not None:
        _auth_metrics(w, auth)
    cache = doc.get("cache")
    if cache is not None:  # ai/cache.py: the response cache, summed over workers
        for k, what in (("hits", "Requests answered from the response cache."),
                        ("misses", "Cacheable requests not found in the response cache."),
                        ("evictions", "Answers dropped from the response cache for room (LRU)."),
                        ("expired", "Answers dropped from the response cache past their ttl.")):
            w.one(f"neurohttp_cache_{k}_total", "counter", what, cache[k])
        w.one("neurohttp_cache_bytes", "gauge", "Bytes of answers in the response caches.",
              cache["bytes"])
        w.one("neurohttp_cache_entries", "gauge", "Answers in the response caches.",
              cache["entries"])
    deps = doc.get("deployments")
    if deps:
        _deployment_metrics(w, deps)
    fw = doc.get("firewall")
    if fw is not None:
        w.family("neurohttp_firewall_refused_total", "counter",
                 "Connections and requests the firewall refused, by rule (allow, deny: "
                 "403; conn_per_ip, rps_per_ip: 429; ua, path: 403).",
                 [({"rule": r}, n) for r, n in fw["refused"].items()])
    router = doc.get("router")
    if router is not None:
        _router_metrics(w, router)
    return w.text()


_BREAKER = ("closed", "open", "half_open")


def _router_metrics(w: _Writer, router: dict[str, Any]) -> None:
    """The router's figures (gateway/routing.py Routes.figures), summed over the
    workers: per model and per deployment (its index in the model's list)."""
    models = router.items()
    deps = [({"model": m, "deployment": d["deployment"]}, d)
            for m, r in models for d in r["deployments"]]
    for name, key, help_text in (
            ("retries", "retries", "Retries sent (before the first byte), by model."),
            ("hedges", "hedges", "Hedged attempts sent (hedge_after_ms), by model."),
            ("fallbacks", "fallbacks", "Requests that went on to a fallback model, by model."),
            ("retries_refused", "retries_refused",
             "Retries and hedges the model's retry budget refused."),
            ("failed", "failed", "Requests that failed on every deployment and fallback.")):
        w.family(f"neurohttp_router_{name}_total", "counter", help_text,
                 [({"model": m}, r[key]) for m, r in models])
    w.family("neurohttp_deployment_outstanding", "gauge",
             "Requests in flight to a deployment, from every worker.",
             [(lab, d["outstanding"]) for lab, d in deps])
    for name, key, help_text in (
            ("attempts", "requests", "Attempts sent to a deployment."),
            ("attempt_errors", "errors", "Attempts that failed (before or during the answer)."),
            ("retries", "retries", "Attempts that were retries."),
            ("hedges", "hedges", "Attempts that were hedges."),
            ("breaker_opened", "breaker_opened", "Times the circuit breaker opened."),
            ("breaker_probes", "breaker_probes", "Half-open probes sent."),
            ("breaker_closed", "breaker_closed", "Times a probe closed the breaker.")):
        w.family(f"neurohttp_deployment_{name}_total", "counter", help_text,
                 [(lab, d[key]) for lab, d in deps])
    w.family("neurohttp_deployment_breaker_state", "gauge",
             "The circuit breaker's state: 1 for the state it is in.",
             [({**lab, "state": st}, int(d["breaker"] == st)) for lab, d in deps
              for st in _BREAKER])
    w.family("neurohttp_deployment_ttfb_ewma_seconds", "gauge",
             "Recent time to first byte (an EWMA; lowest_latency chooses by it).",
             [(lab, d["ttfb_ms"] / 1000) for lab, d in deps])


def _auth_metrics(w: _Writer, auth: dict[str, Any]) -> None:
    """Per-key figures ([auth]): labelled by the key's name, never the key."""
    keys = auth["keys"]
    w.family("neurohttp_key_requests_total", "counter", "Requests admitted, by API key name.",
             [({"key": k}, v["requests"]) for k, v in keys.items()])
    w.family("neurohttp_key_tokens_total", "counter",
             "Tokens used, by API key name and direction (prompt: in, completion: out).",
             [({"key": k, "direction": d}, v[f"tokens_{d}"])
              for k, v in keys.items() for d in ("in", "out")])
    w.family("neurohttp_key_refused_total", "counter",
             "Requests refused, by API key name and status (403: a model outside the key's "
             "list; 429: over a limit).",
             [({"key": k, "status": st}, v[f]) for k, v in keys.items()
              for st, f in (("403", "forbidden"), ("429", "rate_limited"))])
    w.family("neurohttp_auth_failures_total", "counter",
             "Requests refused 401, by reason (missing, malformed, invalid): no key name "
             "is known for them.",
             [({"reason": r}, n) for r, n in auth["unauthorized"].items()])
    redis = auth.get("redis")
    if redis is not None:
        w.family("neurohttp_redis_errors_total", "counter",
                 "Redis ([state] backend) calls that failed or timed out, and the requests "
                 "then admitted unchecked (fail_open) or refused 503 (fail_closed).",
                 [({"outcome": k}, v) for k, v in redis.items()])


def _deployment_metrics(w: _Writer, deps: dict[str, Any]) -> None:
    """Per upstream deployment of the gateway (gateway/figures.py)."""
    def lab(name: str, d: dict[str, Any]) -> dict[str, Any]:
        return {"model": d["model"], "deployment": name, "origin": d["origin"]}
    w.family("neurohttp_deployment_requests_total", "counter",
             "Upstream attempts, by deployment.",
             [(lab(n, d), d["requests"]) for n, d in deps.items()])
    w.family("neurohttp_deployment_errors_total", "counter",
             "Failed upstream attempts, by deployment and kind.",
             [({**lab(n, d), "kind": k}, v) for n, d in deps.items()
              for k, v in d["errors_by_kind"].items()])
    w.family("neurohttp_deployment_tokens_total", "counter",
             "Tokens the upstream reported, by deployment and direction.",
             [({**lab(n, d), "direction": x}, d[f"tokens_{x}"])
              for n, d in deps.items() for x in ("in", "out")])
    for key, what in (("ttfb_ms", "Time to the first event"), ("latency_ms", "Attempt latency")):
        w.family(f"neurohttp_deployment_{key[:-3]}_seconds", "gauge",
                 f"{what} quantiles since start, by deployment.",
                 [({**lab(n, d), "quantile": q}, d[key][k] / 1000)
                  for n, d in deps.items() for q, k in _QUANTILES])


def plugin_metrics_text(figures: dict[str, dict[str, int]],
                        kinds: dict[tuple[str, str], tuple[str, str]]) -> str:
    """The plugins' figures (app.metric): neurohttp_plugin_<plugin>_<name>, with
    `_total` for counters (plugin and metric names are [a-z0-9_] already)."""
    w = _Writer()
    for plugin, values in figures.items():
        for name, value in values.items():
            kind, help_text = kinds.get((plugin, name), ("gauge", name))
            metric = f"neurohttp_plugin_{plugin}_{name}" + ("_total" if kind == "counter" else "")
            w.one(metric, kind, help_text.replace("\n", " "), value)
    return w.text() if w.lines else ""
