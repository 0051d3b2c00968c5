"""The application: routes, request/response hooks and token filters.

Handlers take a Request and return a Response, a StreamingResponse, or an
awaitable of one of those (an `async def` handler). The connection calls
`App.handle` and never looks at routes itself.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import error_response
from .messages import Request, Response, StreamingResponse

log = logging.getLogger("neurohttp")

Result = Response | StreamingResponse | Awaitable[Response | StreamingResponse]
Handler = Callable[[Request], Result]


class App:
    """Routing table and hooks shared by core routes and plugins."""

    def __init__(self, stats_routes: int = 64) -> None:
        self.routes: dict[str, dict[str, Handler]] = {}
        # The same tables keyed by the raw request target, so the common request
        # ("/health", no query, no escapes) is routed without decoding its path.
        self.raw_routes: dict[bytes, dict[str, Handler]] = {}
        self.before_hooks: list[Callable[[Request], Any]] = []
        self.after_hooks: list[Callable[[Request, Any], Any]] = []
        self.token_filters: list[Callable[[Request, str], str | None]] = []
        self.providers: dict[str, Callable[[dict], Any]] = {}
        self._allow: dict[str, str] = {}
        # Route identity for the stats: each path gets a small index once, when it
        # is registered; 0 is "other" (unmatched paths, and paths past the stats
        # block's room, `stats_routes` with "other"). Keyed by the path and, like
        # raw_routes, by its raw bytes.
        self.route_index: dict[str | bytes, int] = {}
        self.route_names: list[str] = ["other"]
        # The admission step (security/gate.py) when [auth] is on: it runs first
        # and routes through _dispatch itself.
        self.gate: Any = None
        self.stats_routes = stats_routes
        self._routes_full = False  # logged once

    # ------------------------------------------------------------ registration
    def add_route(self, method: str, path: str, handler: Handler) -> None:
        if path not in self.routes:
            if len(self.route_names) < self.stats_routes:
                self.route_index[path] = len(self.route_names)
                if path.isascii() and "%" not in path:
                    self.route_index[path.encode()] = len(self.route_names)
                self.route_names.append(path)
            elif not self._routes_full:
                self._routes_full = True
                log.error("route %s and any later one are counted as 'other' in the stats: "
                          "the stats block has room for %d routes (sized at start from the "
                          "config); raise [stats] max_routes and restart",
                          path, self.stats_routes - 1)
        methods = self.routes.setdefault(path, {})
        if path.isascii() and "%" not in path:
            self.raw_routes[path.encode()] = methods
        methods[method.upper()] = handler
        if "GET" in methods and "HEAD" not in methods:
            methods["HEAD"] = methods["GET"]
        self._allow[path] = ", ".join(sorted(methods))

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add_route(method, path, fn)
            return fn
        return deco

    def before_request(self, fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        self.before_hooks.append(fn)
        return fn

    def after_response(self, fn: Callable[[Request, Any], Any]) -> Callable[[Request, Any], Any]:
        self.after_hooks.append(fn)
        return fn

    def on_token(self, fn: Callable[[Request, str], str | None]) -> Callable[[Request, str], str | None]:
        self.token_filters.append(fn)
        return fn

    def add_provider(self, name: str, factory: Callable[[dict], Any]) -> None:
        self.providers[name] = factory

    # ------------------------------------------------------------ dispatch
    def handle(self, req: Request) -> Result:
        """Route `req`; never raises (a failing handler becomes a 500)."""
        if self.gate is not None:
            try:
                return self.gate.handle(req, self._dispatch)
            except Exception:
                log.exception("admission of %s %s failed", req.method, req.path)
                return error_response(req, 500, "internal server error")
        return self._dispatch(req)

    def _dispatch(self, req: Request) -> Result:
        if self.before_hooks or self.after_hooks:
            return self._handle_hooked(req)
        methods = self.raw_routes.get(req.target)
        if methods is None:
            methods = self.routes.get(req.path)
            if methods is None:
                return error_response(req, 404, f"no route for {req.path}")
        handler = methods.get(req.method)
        if handler is None:
            return self.method_not_allowed(req)
        try:
            return handler(req)
        except Exception:
            log.exception("handler for %s %s failed", req.method, req.path)
            return error_response(req, 500, "internal server error")

    def method_not_allowed(self, req: Request) -> Response:
        allow = self._allow.get(req.path, "")
        return error_response(req, 405, f"method {req.method} not allowed on {req.path}",
                              headers={"Allow": allow})

    def _handle_hooked(self, req: Request) -> Result:
        for hook in self.before_hooks:
            try:
                early = hook(req)
            except Exception:
                log.exception("before_request hook failed")
                return error_response(req, 500, "internal server error")
            if inspect.isawaitable(early):
                return self._finish_async(req, early, from_hook=True)
            if early is not None:
                return self._after(req, early)
        methods = self.routes.get(req.path)
        if methods is None:
            return self._after(req, error_response(req, 404, f"no route for {req.path}"))
        handler = methods.get(req.method)
        if handler is None:
            return self._after(req, self.method_not_allowed(req))
        try:
            result = handler(req)
        except Exception:
            log.exception("handler for %s %s failed", req.method, req.path)
            return self._after(req, error_response(req, 500, "internal server error"))
        if inspect.isawaitable(result):
            return self._finish_async(req, result, from_hook=False)
        return self._after(req, result)

    async def _finish_async(self, req: Request, pending: Awaitable[Any], from_hook: bool) -> Any:
        result = await pending
        if from_hook and result is None:
            # an async before_request hook let the request through
            handler = self.routes.get(req.path, {}).get(req.method)
            if handler is None:
                return self._after(req, self.method_not_allowed(req) if req.path in self.routes
                                   else error_response(req, 404, f"no route for {req.path}"))
            result = handler(req)
            if inspect.isawaitable(result):
                result = await result
        return self._after(req, result)

    def _after(self, req: Request, resp: Any) -> Any:
        if self.after_hooks and type(resp) is Response:
            # handlers may share one Response between requests (e.g. /health's
            # per-second cache): hooks change a copy, never the shared object
            resp = Response(resp.body, resp.status, dict(resp.headers), resp.content_type,
                            resp.trusted_headers)
        for hook in self.after_hooks:
            try:
                hook(req, resp)
            except Exception:
                log.exception("after_response hook failed")
        return resp
