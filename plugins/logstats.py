"""One JSON line of the server's figures every interval, once per server.

    [plugins]
    enabled = ["logstats"]

    [plugins.logstats]
    interval_s = 60     # 1 .. 60: the server keeps per-second figures for the last minute
    path = ""           # a file (appended to, reopened on USR1); "": the error log (level info)

Each line covers the `interval_s` whole seconds that ended one second before
it is written (the workers close each second's figures on their next tick,
half a second at most; the second of slack means none is still open), at the
multiples of interval_s since the epoch, so consecutive lines tile time with
no gap and no overlap: summed, they give /stats' totals. It holds:

    time, start, end (Unix seconds, [start, end)), interval_s,
    requests, rps, status {1xx..5xx}, latency_ms {p50, p90, p99},
    tokens_in, tokens_out, tokens_per_s (completion tokens a second),
    active_streams, active_connections, workers (as the line is written),
    models {name: {requests, errors, tokens_in, tokens_out, tokens_per_s, latency_ms}},
    routes {path: {requests, status, latency_ms}}   (those with requests in it)

Written on the public plugin API only: app.every(once_per_server=True) picks
one worker per interval (whichever worker is alive), app.stats(start, end)
reads the whole server's figures for the interval, app.on_reopen reopens the
file on USR1.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import IO, Any

from neurohttp.plugins import OptionError

OPTIONS = {"interval_s": int, "path": str}


def validate(options: dict[str, Any]) -> None:
    n = options.get("interval_s", 60)
    if not 1 <= n <= 60:
        raise OptionError("interval_s", f"must be from 1 to 60 (seconds), not {n}")


def _window_row(w: dict[str, Any], seconds: int) -> dict[str, Any]:
    return {"requests": w["requests"], "status": w["status"], "latency_ms": w["latency_ms"]}


def line_for(doc: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """The line of the interval [start, end) from the /stats document whose
    windowed figures cover it (app.stats(start, end))."""
    seconds = end - start
    w = doc["window"]
    models = {}
    for name, m in doc["models"].items():
        mw = m["window"]
        if mw["requests"] or mw["tokens_in"] or mw["tokens_out"] or mw["errors"]:
            models[name] = {"requests": mw["requests"], "errors": mw["errors"],
                            "tokens_in": mw["tokens_in"], "tokens_out": mw["tokens_out"],
                            "tokens_per_s": round(mw["tokens_out"] / seconds, 3),
                            "latency_ms": mw["latency_ms"]}
    routes = {name: _window_row(r["window"], seconds) for name, r in doc["routes"].items()
              if r["window"]["requests"]}
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)),
        "start": start, "end": end, "interval_s": seconds,
        "requests": w["requests"], "rps": round(w["requests"] / seconds, 3),
        "status": w["status"], "latency_ms": w["latency_ms"],
        "tokens_in": w["tokens_in"], "tokens_out": w["tokens_out"],
        "tokens_per_s": round(w["tokens_out"] / seconds, 3),
        "active_streams": doc["streams_active"],
        "active_connections": doc["active_connections"],
        "workers": doc["master"]["workers"],
        "models": models, "routes": routes,
    }


class LogStats:
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.app = app
        self.interval = options.get("interval_s", 60)
        self.path = options.get("path", "")
        self.file: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self.file is None:
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        return self.file

    def reopen(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None  # opened again at the next line, under the path's new file

    def write(self) -> None:
        # the period this run is for: its boundary, whole seconds, one second back
        p = self.interval
        end = math.floor(time.time() / p) * p - 1
        doc = self.app.stats(end - p, end)
        text = json.dumps(line_for(doc, end - p, end), separators=(",", ":"))
        if not self.path:
            self.app.log.info("%s", text)
            return
        f = self._open()
        f.write(text + "\n")
        f.flush()


def setup(app: Any, options: dict[str, Any]) -> None:
    ls = LogStats(app, options)
    app.every(ls.interval, ls.write, once_per_server=True)
    app.on_reopen(ls.reopen)
