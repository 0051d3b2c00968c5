"""`neurohttpd top`: a live terminal view of /stats (rich), refreshed every second.

It reads the server over HTTP, like the dashboard, so it works for a remote
server (`-u URL`) as well as a local one, and needs no access to its shared memory.
"""

from __future__ import annotations

import http.client
import signal
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


class StatsClient:
    """GET /stats from a server's base URL, over one kept-alive connection."""

    def __init__(self, url: str, timeout: float = 3.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.path = (parts.path.rstrip("/") or "") + "/stats"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.https = parts.scheme == "https"
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self) -> dict[str, Any]:
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            if self.conn is None:
                cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self.conn = cls(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", self.path, headers={"Accept": "application/json"})
                r = self.conn.getresponse()
                body = r.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
                continue
            if r.status != 200:
                raise OSError(f"HTTP {r.status} from {self.url}{self.path}")
            doc: dict[str, Any] = orjson.loads(body)
            return doc
        raise OSError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.{digits}f}"


def _uptime(s: int) -> str:
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h" if d else f"{h}h {m}m" if h else f"{m}m {s}s"


class CpuMeter:
    """CPU % per pid from the change in CPU seconds between two reads."""

    def __init__(self) -> None:
        self.prev: dict[int, tuple[float, float]] = {}
        self.pct: dict[int, float] = {}

    def update(self, doc: dict[str, Any]) -> None:
        now = time.monotonic()
        procs = [(w["pid"], w.get("process")) for w in doc.get("workers", [])]
        procs.append((doc["master"]["pid"], doc["master"].get("process")))
        nxt = {}
        for pid, p in procs:
            if not p:
                continue
            prev = self.prev.get(pid)
            if prev and now > prev[1]:
                self.pct[pid] = 100 * (p["cpu_seconds"] - prev[0]) / (now - prev[1])
            nxt[pid] = (p["cpu_seconds"], now)
        self.prev = nxt


BREAKER_STYLES = {"closed": "green", "open": "bold red", "half-open": "yellow"}


def breaker_name(state: str | None) -> str:
    """/stats' "half_open" as people write it; "-" when unknown."""
    return state.replace("_", "-") if state else "-"


def router_state(router: dict[str, Any], dep: dict[str, Any]) -> dict[str, Any]:
    """Deployment `dep`'s entry (of /stats "deployments") in /stats "router":
    its breaker, outstanding requests, retries, hedges ({} when absent)."""
    rows = router.get(dep.get("model", ""), {}).get("deployments", [])
    i = dep.get("index", -1)
    return rows[i] if 0 <= i < len(rows) else {}


def render(doc: dict[str, Any] | None, url: str, cpu: CpuMeter, error: str | None = None) -> Group:
    """The whole screen for one /stats document."""
    if doc is None:
        return Group(Text(f"neurohttpd top - {url}", style="bold"),
                     Text(f"cannot read {url}/stats: {error} (retrying)", style="red"))
    win = doc["window"]
    series = win["series"]
    rps_last = series["rps"][-1] if series["rps"] else 0
    m = doc["master"]
    head = Text.assemble(
        ("neurohttpd top", "bold"), f" - {url}  v{doc.get('version', '?')}  up {_uptime(doc['uptime'])}"
        f"  master {m['pid']}  workers {len(doc['workers'])}  generation {m['generation']}"
        f"  reloads {m['reloads']}  restarts {m['restarts']}")
    lat = win["latency_ms"]
    totals = Text.assemble(
        ("req/s ", "dim"), (f"{_f(rps_last)}", "bold cyan"), (" (1 s)  ", "dim"),
        (f"{_f(win['rps'], 1)}", "bold"), (f" ({win['seconds']} s)   ", "dim"),
        ("p50/p90/p99 ", "dim"), (f"{lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f} ms", "bold"),
        ("   conns ", "dim"), (str(doc["active_connections"]), "bold"),
        ("   streams ", "dim"), (str(doc["streams_active"]), "bold"),
        ("   tokens/s ", "dim"), (_f(win["tokens_out_per_s"], 1), "bold"),
        ("   requests ", "dim"), (str(doc["requests"]), "bold"),
        ("   errors 4xx/5xx ", "dim"), (f"{doc['status']['4xx']}/{doc['status']['5xx']}", "bold"))

    wt = Table(title="workers (req/s: last second, 60 s average; latency ms over 60 s)",
               title_justify="left", box=None, padding=(0, 1))
    for col in ("id", "pid", "state", "req/s", "60s", "p50", "p99", "conn", "strm", "cpu%",
                "MiB", "fds"):
        wt.add_column(col, justify="left" if col in ("id", "state") else "right", no_wrap=True)
    rows = [("master", m["pid"], "", None, None, None, None, None, None, m.get("process"))]
    for w in doc["workers"]:
        ww = w["window"]
        rows.append((str(w["id"]), w["pid"], w["state"], ww["rps_last"], ww["rps"],
                     ww["latency_ms"]["p50"], ww["latency_ms"]["p99"], w["active_connections"],
                     w["streams_active"], w.get("process")))
    for wid, pid, state, r1, r60, p50, p99, conns, streams, proc in rows:
        wt.add_row(wid, str(pid), state, _f(r1), _f(r60, 1), _f(p50, 2), _f(p99, 2),
                   _f(conns), _f(streams), _f(cpu.pct.get(pid), 0),
                   _f(proc["rss_bytes"] / 1048576, 1) if proc else "-",
                   str(proc["open_fds"]) if proc else "-")

    rt = Table(title="routes (last 60 s; counts since start)", title_justify="left", box=None,
               padding=(0, 1))
    for col in ("route", "req/s", "p50 ms", "p99 ms", "requests", "2xx", "4xx", "5xx"):
        rt.add_column(col, justify="left" if col == "route" else "right")
    for name, r in doc.get("routes", {}).items():
        if not r["requests"]:
            continue
        rw = r["window"]
        rt.add_row(name, _f(rw["rps"], 2), _f(rw["latency_ms"]["p50"], 2),
                   _f(rw["latency_ms"]["p99"], 2), _f(r["requests"]), _f(r["status"]["2xx"]),
                   _f(r["status"]["4xx"]), _f(r["status"]["5xx"]))

    parts: list[Any] = [head, totals, Text(""), wt, Text(""), rt]
    models = doc.get("models", {})
    if models:
        mt = Table(title="models (last 60 s; counts since start)", title_justify="left",
                   box=None, padding=(0, 1))
        for col in ("model", "req/s", "tokens/s", "p50 ms", "p99 ms", "requests", "tokens in",
                    "tokens out", "errors"):
            mt.add_column(col, justify="left" if col == "model" else "right")
        for name, md in models.items():
            mw = md["window"]
            mt.add_row(name, _f(mw["rps"], 2), _f(mw["tokens_out_per_s"], 1),
                       _f(mw["latency_ms"]["p50"], 2), _f(mw["latency_ms"]["p99"], 2),
                       _f(md["requests"]), _f(md["tokens_in"]), _f(md["tokens_out"]),
                       _f(md["errors"]))
        parts += [Text(""), mt]
    deps = doc.get("deployments", {})
    router = doc.get("router", {})
    if deps:  # the gateway's upstreams (docs/ROUTING.md), with their router state
        dt = Table(title="deployments (last 60 s; counts since start)", title_justify="left",
                   box=None, padding=(0, 1))
        for col in ("deployment", "origin", "breaker", "out", "req/s", "ttfb p50", "p99 ms",
                    "requests", "errors", "retries", "hedges", "tokens in", "tokens out"):
            dt.add_column(col, justify="left" if col in ("deployment", "origin", "breaker")
                          else "right")
        for name, d in deps.items():
            dw = d["window"]
            r = router_state(router, d)
            breaker = breaker_name(r.get("breaker"))
            dt.add_row(name, d["origin"], Text(breaker, style=BREAKER_STYLES.get(breaker, "")),
                       _f(r.get("outstanding")), _f(dw["rps"], 2), _f(dw["ttfb_ms"]["p50"], 2),
                       _f(dw["latency_ms"]["p99"], 2), _f(d["requests"]), _f(d["errors"]),
                       _f(r.get("retries")), _f(r.get("hedges")),
                       _f(d["tokens_in"]), _f(d["tokens_out"]))
        parts += [Text(""), dt]
    if router:  # per public model: what the router did (since start)
        rt = Table(title="router (counts since start)", title_justify="left", box=None,
                   padding=(0, 1))
        for col in ("model", "requests", "failed", "retries", "hedges", "fallbacks",
                    "retries refused"):
            rt.add_column(col, justify="left" if col == "model" else "right")
        for name, r in router.items():
            rt.add_row(name, _f(r["requests"]), _f(r["failed"]), _f(r["retries"]),
                       _f(r["hedges"]), _f(r["fallbacks"]), _f(r["retries_refused"]))
        parts += [Text(""), rt]
    auth = doc.get("auth")
    if auth:  # [auth] on: per key since start; a 401 names no key, so by reason
        kt = Table(title="API keys (counts since start)", title_justify="left", box=None,
                   padding=(0, 1))
        for col in ("key", "requests", "tokens in", "tokens out", "403 model", "429 limit"):
            kt.add_column(col, justify="left" if col == "key" else "right")
        for name, k in auth["keys"].items():
            kt.add_row(name, _f(k["requests"]), _f(k["tokens_in"]), _f(k["tokens_out"]),
                       _f(k["forbidden"]), _f(k["rate_limited"]))
        parts += [Text(""), kt, Text("401 without a good key: " + "  ".join(
            f"{reason} {n}" for reason, n in auth["unauthorized"].items()), style="dim")]
    parts.append(Text("Ctrl-C to quit", style="dim"))
    return Group(*parts)


def run(url: str, interval: float = 1.0, console: Console | None = None,
        once: bool = False) -> int:
    """Show the view until Ctrl-C; returns the exit status (0). `once`: print
    one frame and return (1 when /stats could not be read), for scripts."""
    client = StatsClient(url)
    cpu = CpuMeter()
    console = console or Console()
    if once:
        try:
            doc = client.get()
        except (OSError, ValueError, http.client.HTTPException) as e:
            console.print(render(None, client.url, cpu, str(e) or type(e).__name__))
            return 1
        finally:
            client.close()
        cpu.update(doc)
        console.print(render(doc, client.url, cpu))
        return 0

    def frame() -> Group:
        try:
            doc = client.get()
        except (OSError, ValueError, http.client.HTTPException) as e:
            return render(None, client.url, cpu, str(e) or type(e).__name__)
        cpu.update(doc)
        return render(doc, client.url, cpu)

    # Ctrl-C quits even when SIGINT came inherited as ignored (a background job
    # of a non-interactive shell): Python leaves an ignored SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if not console.is_terminal:
            # not a terminal (a pipe, a log): print one frame per interval
            while True:
                console.print(frame())
                time.sleep(interval)
        with Live(frame(), console=console, screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, previous)
        client.close()
