"""GET / (the home page) and GET /health (/stats is in handlers/metrics.py)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import orjson

from .. import __version__
from ..context import Services
from ..messages import Request, Response

if TYPE_CHECKING:
    from ..app import App

_JSON = "application/json"


class SiteHandlers:
    def __init__(self, services: Services) -> None:
        self.stats = services.stats
        self.models = services.models
        self.clock = services.clock
        self._health_second = -1
        self._health: Response | None = None

    def register(self, app: App) -> None:
        app.add_route("GET", "/", self.index)
        app.add_route("GET", "/health", self.health)

    def uptime(self, second: int) -> int:
        return max(0, second - self.stats.started())

    def health(self, req: Request) -> Response:
        sec = self.clock.second  # the worker's clock (its tick, twice a second)
        if sec != self._health_second or self._health is None:
            # uptime changes once a second; the worker count is re-read at the same time
            self._health = Response(orjson.dumps({
                "status": "ok", "version": __version__, "uptime": self.uptime(sec),
                "workers": self.stats.workers()}), 200, None, _JSON)
            self._health_second = sec
        return self._health

    def index(self, req: Request) -> Response:
        up = self.uptime(self.clock.second)
        models = ", ".join(html.escape(m) for m in self.models.names())
        links = "".join(
            f'<li><a href="{p}"><code>{m} {p}</code></a> &mdash; {html.escape(d)}</li>'
            for m, p, d in (
                ("GET", "/health", "liveness, version, uptime, workers"),
                ("GET", "/stats", "request, latency and token counters across workers"),
                ("GET", "/metrics", "the same figures for Prometheus"),
                ("GET", "/dashboard", "live charts of the figures"),
                ("POST", "/v1/chat", 'the seed API: {"prompt": "..."}'),
                ("POST", "/v1/chat/completions", "OpenAI-compatible chat completions (SSE with stream)"),
                ("GET", "/v1/models", "OpenAI-compatible model list"),
                ("GET", "/v1/ws", 'WebSocket chat: send {"prompt": "..."}, receive tokens'),
            ))
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>NeuroHTTP {__version__}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;
line-height:1.5}}code{{background:#f3f3f3;padding:0 .2em}}</style></head>
<body><h1>NeuroHTTP</h1>
<p>An AI-native HTTP server. Version <b>{__version__}</b>, up <b>{up}</b> s,
<b>{self.stats.workers()}</b> workers. Models: {models}.</p>
<ul>{links}</ul>
<pre>curl -s localhost/v1/chat -d '{{"prompt":"Hello"}}'</pre>
</body></html>
"""
        return Response.html(page)
