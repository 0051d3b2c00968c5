"""The application: routes, request/response hooks and token filters.

Handlers take a Request and return a Response, a StreamingResponse, or an
awaitable of one of those (an `async def` handler). The connection calls
`App.handle` and never looks at routes itself.

Routes are exact paths; `mount(prefix)` routes every path under a prefix that
no exact route takes (the longest prefix first). A route or mount made with
`stream_body=True` gets its request as soon as the head has arrived and reads
the body with `request.stream()` (protocol/h1stream.py), up to its
`max_upload_bytes` (0: [server] max_upload_bytes) instead of max_body_bytes.
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

DEFAULT_MAX_UPLOAD = 1 << 30  # [server] max_upload_bytes


class Mount:
    """Every path under `prefix` ("/v1/files" takes /v1/files and /v1/files/...;
    "/v1/audio/" what starts with it), for `methods` (None: any)."""

    __slots__ = ("prefix", "under", "handler", "methods", "upload")

    def __init__(self, prefix: str, handler: Handler, methods: frozenset[str] | None,
                 upload: int) -> None:
        self.prefix = prefix
        self.under = prefix if prefix.endswith("/") else prefix + "/"
        self.handler = handler
        self.methods = methods
        self.upload = upload  # -1: collected body; 0: the server's upload limit; else bytes

    def takes(self, path: str) -> bool:
        return path.startswith(self.under) or path == self.prefix


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
        # Streamed-body routes: path -> method -> upload limit (0: the server's);
        # prefix mounts, longest first. max_upload > 0 makes the connections
        # parse for streamed bodies (none when no route streams: no cost).
        self.uploads: dict[str, dict[str, int]] = {}
        self.mounts: list[Mount] = []
        self.max_upload_bytes = DEFAULT_MAX_UPLOAD  # the worker sets [server] max_upload_bytes
        self._max_upload: tuple[int, int] | None = None  # (max_upload_bytes, max_upload)
        # The worker's shared upstream HTTP client (upstream.UpstreamClient), made
        # after the fork and closed at drain by the worker; plugins take pools
        # from it (app.upstream.pool(url, ...)) and never open their own.
        self.upstream: Any = None

    # ------------------------------------------------------------ registration
    def add_route(self, method: str, path: str, handler: Handler, *, stream_body: bool = False,
                  max_upload_bytes: int = 0) -> None:
        if max_upload_bytes < 0:
            raise ValueError("max_upload_bytes must be >= 0")
        self._max_upload = None
        if stream_body:
            self.uploads.setdefault(path, {})[method.upper()] = max_upload_bytes
        else:
            self.uploads.get(path, {}).pop(method.upper(), None)
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

    def route(self, method: str, path: str, *, stream_body: bool = False,
              max_upload_bytes: int = 0) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add_route(method, path, fn, stream_body=stream_body,
                           max_upload_bytes=max_upload_bytes)
            return fn
        return deco

    def add_mount(self, prefix: str, handler: Handler, *, methods: list[str] | None = None,
                  stream_body: bool = False, max_upload_bytes: int = 0) -> None:
        if not prefix.startswith("/"):
            raise ValueError(f"mount prefix {prefix!r} must start with /")
        if max_upload_bytes < 0:
            raise ValueError("max_upload_bytes must be >= 0")
        self._max_upload = None
        m = Mount(prefix, handler, frozenset(x.upper() for x in methods) if methods else None,
                  max_upload_bytes if stream_body else -1)
        self.mounts = sorted([x for x in self.mounts if x.prefix != prefix] + [m],
                             key=lambda x: -len(x.prefix))

    def mount(self, prefix: str, *, methods: list[str] | None = None, stream_body: bool = False,
              max_upload_bytes: int = 0) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add_mount(prefix, fn, methods=methods, stream_body=stream_body,
                           max_upload_bytes=max_upload_bytes)
            return fn
        return deco

    def mounted(self, path: str) -> Mount | None:
        """The mount that takes `path` (no exact route does), or None."""
        if path in self.routes:
            return None
        for m in self.mounts:
            if m.takes(path):
                return m
        return None

    # ------------------------------------------------------------ streamed bodies
    @property
    def max_upload(self) -> int:
        """The largest upload limit of a streamed route; 0 when none streams
        (read for each connection: computed once routes are registered)."""
        cached = self._max_upload
        if cached is not None and cached[0] == self.max_upload_bytes:
            return cached[1]
        limits = [lim for methods in self.uploads.values() for lim in methods.values()]
        limits += [m.upload for m in self.mounts if m.upload >= 0]
        value = max((lim or self.max_upload_bytes for lim in limits), default=0)
        self._max_upload = (self.max_upload_bytes, value)
        return value

    def upload_limit(self, req: Request) -> int:
        """The upload limit of `req`'s route if it streams its body, else 0 (the
        parser asks at each head with a body, on servers with streamed routes)."""
        path = req.path
        methods = self.uploads.get(path)
        if methods is not None:
            lim = methods.get(req.method)
            return 0 if lim is None else lim or self.max_upload_bytes
        m = self.mounted(path)
        if m is None or m.upload < 0 or (m.methods is not None and req.method not in m.methods):
            return 0
        return m.upload or self.max_upload_bytes

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
                return self._dispatch_mounted(req)
        handler = methods.get(req.method)
        if handler is None:
            return self.method_not_allowed(req)
        try:
            return handler(req)
        except Exception:
            log.exception("handler for %s %s failed", req.method, req.path)
            return error_response(req, 500, "internal server error")

    def _mounted_handler(self, req: Request) -> Handler | Response:
        """The handler of a path no exact route takes, or the 404/405 answer."""
        m = self.mounted(req.path)
        if m is None:
            return error_response(req, 404, f"no route for {req.path}")
        if m.methods is not None and req.method not in m.methods:
            return error_response(req, 405, f"method {req.method} not allowed on {req.path}",
                                  headers={"Allow": ", ".join(sorted(m.methods))})
        return m.handler

    def _dispatch_mounted(self, req: Request) -> Result:
        handler = self._mounted_handler(req)
        if type(handler) is Response:
            return handler
        try:
            return handler(req)  # type: ignore[operator]
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
        found: Handler | Response | None
        if methods is None:
            found = self._mounted_handler(req)
        else:
            found = methods.get(req.method)
            if found is None:
                found = self.method_not_allowed(req)
        if type(found) is Response:
            return self._after(req, found)
        handler: Handler = found  # type: ignore[assignment]
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
            methods = self.routes.get(req.path)
            found = self._mounted_handler(req) if methods is None else (
                methods.get(req.method) or self.method_not_allowed(req))
            if type(found) is Response:
                return self._after(req, found)
            result = found(req)  # type: ignore[operator]
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
