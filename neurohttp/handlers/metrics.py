"""GET /stats, /metrics and /dashboard (with its script and styles).

All three read the shared-memory block, and `[stats] allow` limits who may:
a client outside every listed network gets 403 ([] allows everyone).
"""

from __future__ import annotations

import ipaddress
from importlib import resources
from typing import TYPE_CHECKING

import orjson

from ..context import Services
from ..errors import error_response
from ..messages import Request, Response
from ..stats.prometheus import CONTENT_TYPE as PROM_TYPE
from ..stats.prometheus import metrics_text

if TYPE_CHECKING:
    from ..app import App

_JSON = "application/json"
_NO_STORE = {"Cache-Control": "no-store"}
# (path, package file, content type) of the dashboard: served from the wheel, no CDN
STATIC = (
    ("/dashboard", "dashboard.html", "text/html; charset=utf-8"),
    ("/dashboard/app.js", "dashboard.js", "text/javascript; charset=utf-8"),
    ("/dashboard/app.css", "dashboard.css", "text/css; charset=utf-8"),
)


def static_file(name: str) -> bytes:
    """A file of neurohttp/static/ (package data)."""
    return resources.files("neurohttp").joinpath("static", name).read_bytes()


class AllowList:
    """Which client addresses may read the stats; an empty list allows everyone."""

    def __init__(self, networks: list[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._seen: dict[str, bool] = {}

    def __call__(self, client: str) -> bool:
        if not self.networks:
            return True
        ok = self._seen.get(client)
        if ok is None:
            ok = self._check(client)
            if len(self._seen) > 4096:  # a bound, not a cache policy: clients are few
                self._seen.clear()
            self._seen[client] = ok
        return ok

    def _check(self, client: str) -> bool:
        try:
            ip = ipaddress.ip_address(client.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
        return any(ip.version == n.version and ip in n for n in self.networks)


class MetricsHandlers:
    def __init__(self, services: Services) -> None:
        self.stats_reader = services.stats
        self.allowed = AllowList(list(services.settings.stats_allow))
        self.files = {path: (static_file(name), ctype) for path, name, ctype in STATIC}

    def register(self, app: App) -> None:
        app.add_route("GET", "/stats", self.stats)
        app.add_route("GET", "/metrics", self.metrics)
        for path in self.files:
            app.add_route("GET", path, self.static)

    def _forbidden(self, req: Request) -> Response:
        return error_response(req, 403, f"{req.client} may not read the stats "
                              "(see [stats] allow)")

    def stats(self, req: Request) -> Response:
        if not self.allowed(req.client):
            return self._forbidden(req)
        doc = self.stats_reader.document(self.stats_reader.snapshot())
        return Response(orjson.dumps(doc), 200, dict(_NO_STORE), _JSON)

    def metrics(self, req: Request) -> Response:
        if not self.allowed(req.client):
            return self._forbidden(req)
        reader = self.stats_reader
        snap = reader.snapshot()
        doc = reader.document(snap)
        text = metrics_text(snap, doc)
        for more in reader.metric_texts:
            text += more(doc)
        return Response(text, 200, dict(_NO_STORE), PROM_TYPE)

    def static(self, req: Request) -> Response:
        if not self.allowed(req.client):
            return self._forbidden(req)
        body, ctype = self.files[req.path]
        return Response(body, 200, {"Cache-Control": "no-cache"}, ctype)
