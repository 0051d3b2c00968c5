"""The application: routes, request/response hooks and token filters.

Handlers take a Request and return a Response, a StreamingResponse, or an
awaitable of one of those (an `async def` handler). The connection calls
`App.handle` and never looks at routes itself.

Routes are exact paths; `mount(prefix)` routes every path under a prefix that
no exact route takes (the longest prefix first). A route or mount made with
`stream_body=True` gets its request as soon as the head has arrived and reads
the body with `request.stream()` (protocol/h1stream.py), up to its
`max_upload_bytes` (0: [server] max_upload_bytes) instead of max_body_bytes.

Plugins register through their own facade (neurohttp/plugins.py PluginApp),
which passes its name as the `owner` of what it adds: a route that collides
with another owner's is an error at load (RouteConflict), a hook or a plugin
route that raises or answers with a malformed Response gives a 500 and one
log line naming the plugin, the hook or route and the exception, and the core
routes (owner "") are trusted and never checked on the request path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import error_response
from .messages import BodyError, Request, Response, StreamingResponse, WebSocketUpgrade

log = logging.getLogger("neurohttp")
_new = object.__new__

Result = Response | StreamingResponse | Awaitable[Response | StreamingResponse]
Handler = Callable[[Request], Result]
Hook = Callable[..., Any]

CORE = ""  # the owner of the core routes


class RouteConflict(Exception):
    """A route registered twice by different owners (a plugin and the core, or two plugins)."""


def owner_text(owner: str) -> str:
    return f"plugin {owner!r}" if owner else "the core"


def response_problem(r: Any) -> str | None:
    """What is wrong with a plugin's answer (None: nothing), checked before the
    connection serializes it: a dict body or a string status would otherwise
    fail half-way through writing and drop the connection."""
    t = type(r)
    if t is Response or t is StreamingResponse:
        st = r.status
        if type(st) is not int or not 100 <= st <= 599:
            return f"status {st!r} is not an int from 100 to 599"
        if t is Response and type(r.body) not in (bytes, bytearray, memoryview):
            return f"body is {type(r.body).__name__}, not bytes or str"
        if t is StreamingResponse and not hasattr(r.chunks, "__aiter__"):
            return f"chunks is {type(r.chunks).__name__}, not an async iterator of bytes"
        if type(r.content_type) is not str:
            return f"content_type is {type(r.content_type).__name__}, not str"
        if type(r.trusted_headers) is not bytes:
            return f"trusted_headers is {type(r.trusted_headers).__name__}, not bytes"
        h = r.headers
        if not isinstance(h, dict):
            return f"headers is {type(h).__name__}, not a dict"
        for k, v in h.items():
            if type(k) is not str or type(v) is not str:
                return f"header {k!r}: {v!r} is not a str name with a str value"
        return None
    if t is WebSocketUpgrade:
        return None
    return f"answer is {t.__name__}, not a Response or StreamingResponse"


def tag_owner(fn: Any, owner: str) -> None:
    """Mark `fn` (a function or a bound method's function) as `owner`'s, for
    the code that logs its failures far from the App (the pipeline's token
    filters: context.plugin_of)."""
    target = getattr(fn, "__func__", fn)
    try:
        target.__neurohttp_plugin__ = owner
    except (AttributeError, TypeError):
        pass  # a builtin or a callable object with __slots__: the module names it

DEFAULT_MAX_UPLOAD = 1 << 30  # [server] max_upload_bytes


class Mount:
    """Every path under `prefix` ("/v1/files" takes /v1/files and /v1/files/...;
    "/v1/audio/" what starts with it), for `methods` (None: any)."""

    __slots__ = ("prefix", "under", "handler", "methods", "upload", "owner")

    def __init__(self, prefix: str, handler: Handler, methods: frozenset[str] | None,
                 upload: int, owner: str = "") -> None:
        self.owner = owner
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
        # who added each (method, path): CORE or a plugin's name
        self.route_owner: dict[tuple[str, str], str] = {}
        self.before_hooks: list[Hook] = []
        self.before_owners: list[str] = []
        self.after_hooks: list[Hook] = []
        self.after_owners: list[str] = []
        self.token_filters: list[Callable[[Request, str], str | None]] = []
        self.providers: dict[str, Callable[[dict], Any]] = {}
        self.provider_owner: dict[str, str] = {}
        # async hooks run on the worker's loop before it serves / after it drained
        self.startup: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        self.shutdown: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        # run on SIGUSR1, when the worker reopens its log files
        self.reopen: list[tuple[str, Callable[[], Any]]] = []
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
    def add_route(self, method: str, path: str, handler: Handler, owner: str = CORE, *,
                  stream_body: bool = False, max_upload_bytes: int = 0) -> None:
        if max_upload_bytes < 0:
            raise ValueError("max_upload_bytes must be >= 0")
        method = method.upper()
        prev = self.route_owner.get((method, path))
        if prev is not None and prev != owner:
            if not owner:
                raise RouteConflict(f"plugin {prev!r}: route {method} {path} collides with "
                                    f"a core route")
            raise RouteConflict(f"plugin {owner!r}: route {method} {path} collides with "
                                f"{'a core route' if not prev else f'a route of plugin {prev!r}'}")
        if owner:
            handler = PluginRoute(owner, method, path, handler)
        self._max_upload = None
        if stream_body:
            self.uploads.setdefault(path, {})[method] = max_upload_bytes
        else:
            self.uploads.get(path, {}).pop(method, None)
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
        methods[method] = handler
        self.route_owner[(method, path)] = owner
        if "GET" in methods and "HEAD" not in methods:
            methods["HEAD"] = methods["GET"]
            self.route_owner[("HEAD", path)] = self.route_owner[("GET", path)]
        self._allow[path] = ", ".join(sorted(methods))

    def route(self, method: str, path: str, *, stream_body: bool = False,
              max_upload_bytes: int = 0) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add_route(method, path, fn, stream_body=stream_body,
                           max_upload_bytes=max_upload_bytes)
            return fn
        return deco

    def add_mount(self, prefix: str, handler: Handler, owner: str = CORE, *,
                  methods: list[str] | None = None, stream_body: bool = False,
                  max_upload_bytes: int = 0) -> None:
        """Route every path under `prefix` that no exact route takes to `handler`."""
        if not prefix.startswith("/"):
            raise ValueError(f"mount prefix {prefix!r} must start with /")
        if max_upload_bytes < 0:
            raise ValueError("max_upload_bytes must be >= 0")
        prev = next((m for m in self.mounts if m.prefix == prefix), None)
        if prev is not None and prev.owner != owner:
            raise RouteConflict(f"{owner_text(owner)}: mount {prefix} collides with one of "
                                f"{owner_text(prev.owner)}")
        if owner:
            handler = PluginRoute(owner, "*", prefix + "*", handler)
        self._max_upload = None
        m = Mount(prefix, handler, frozenset(x.upper() for x in methods) if methods else None,
                  max_upload_bytes if stream_body else -1, owner)
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

    def before_request(self, fn: Hook, owner: str = CORE) -> Hook:
        tag_owner(fn, owner)
        self.before_hooks.append(fn)
        self.before_owners.append(owner)
        return fn

    def after_response(self, fn: Hook, owner: str = CORE) -> Hook:
        tag_owner(fn, owner)
        self.after_hooks.append(fn)
        self.after_owners.append(owner)
        return fn

    def on_token(self, fn: Callable[[Request, str], str | None],
                 owner: str = CORE) -> Callable[[Request, str], str | None]:
        tag_owner(fn, owner)
        self.token_filters.append(fn)
        return fn

    def add_provider(self, name: str, factory: Callable[[dict], Any], owner: str = CORE) -> None:
        prev = self.provider_owner.get(name)
        if prev is not None and prev != owner:
            raise RouteConflict(f"{owner_text(owner)}: provider {name!r} is already added by "
                                f"{owner_text(prev)}")
        tag_owner(factory, owner)
        self.providers[name] = factory
        self.provider_owner[name] = owner

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

    def _hook_failed(self, req: Request, owner: str, hook: str, fn: Any,
                     exc: BaseException | None = None, problem: str | None = None) -> Response:
        """One log line naming the plugin, the hook and what went wrong; the 500."""
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        if problem is not None:
            log.error("%s: %s hook %s on %s %s answered wrongly: %s", owner_text(owner), hook,
                      name, req.method, req.path, problem)
        else:
            log.error("%s: %s hook %s failed on %s %s: %s: %s", owner_text(owner), hook, name,
                      req.method, req.path, type(exc).__name__, exc, exc_info=exc)
        return error_response(req, 500, "internal server error")

    def _handle_hooked(self, req: Request) -> Result:
        for hook in self.before_hooks:
            try:
                early = hook(req)
            except Exception as e:
                i = self.before_hooks.index(hook)
                return self._after(req, self._hook_failed(req, self.before_owners[i],
                                                          "before_request", hook, e))
            if early is not None:
                i = self.before_hooks.index(hook)
                if type(early) is not Response and inspect.isawaitable(early):
                    # the rest of the hooks run after it, in order: none is skipped
                    return self._async_from(req, early, i)
                return self._after(req, self._early(req, early, i))
        return self._route(req)

    def _early(self, req: Request, early: Any, i: int) -> Any:
        """A before_request hook's own answer, checked."""
        problem = response_problem(early)
        if problem is not None:
            return self._hook_failed(req, self.before_owners[i], "before_request",
                                     self.before_hooks[i], problem=problem)
        return early

    def _route(self, req: Request) -> Result:
        methods = self.raw_routes.get(req.target)
        if methods is None:
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
        if not self.after_hooks:
            return result  # (the connection awaits an awaitable itself)
        if type(result) is not Response and inspect.isawaitable(result):
            return self._finish_async(req, result)
        return self._after(req, result)

    async def _async_from(self, req: Request, pending: Awaitable[Any], i: int) -> Any:
        """Hook i returned an awaitable: await it, then run hooks i+1.. (sync or
        async) in order, then the route."""
        hooks = self.before_hooks
        while True:
            try:
                early = await pending
            except Exception as e:
                return self._after(req, self._hook_failed(req, self.before_owners[i],
                                                          "before_request", hooks[i], e))
            if early is not None:
                return self._after(req, self._early(req, early, i))
            while True:
                i += 1
                if i >= len(hooks):
                    result = self._route(req)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                try:
                    early = hooks[i](req)
                except Exception as e:
                    return self._after(req, self._hook_failed(req, self.before_owners[i],
                                                              "before_request", hooks[i], e))
                if early is None:
                    continue
                if inspect.isawaitable(early):
                    pending = early
                    break
                return self._after(req, self._early(req, early, i))

    async def _finish_async(self, req: Request, pending: Awaitable[Any]) -> Any:
        try:
            result = await pending
        except BodyError:
            raise  # its streamed body failed: the connection answers its status
        except Exception:
            log.exception("handler for %s %s failed", req.method, req.path)
            result = error_response(req, 500, "internal server error")
        return self._after(req, result)

    def _after(self, req: Request, resp: Any) -> Any:
        hooks = self.after_hooks
        if not hooks:
            return resp
        if type(resp) is Response:
            # handlers may share one Response between requests (e.g. /health's
            # per-second cache): hooks change a copy, never the shared object
            r = _new(Response)
            r.body = resp.body
            r.status = resp.status
            r.headers = dict(resp.headers)
            r.content_type = resp.content_type
            r.trusted_headers = resp.trusted_headers
            for hook in hooks:
                try:
                    hook(req, r)
                except Exception as e:
                    i = hooks.index(hook)
                    self._hook_failed(req, self.after_owners[i], "after_response", hook, e)
                    return error_response(req, 500, "internal server error")
                if type(r.status) is not int or type(r.body) is not bytes:
                    problem = response_problem(r)
                    if problem is not None:
                        return self._hook_failed(req, self.after_owners[hooks.index(hook)],
                                                 "after_response", hook, problem=problem)
            return r
        if type(resp) is StreamingResponse:
            # a stream's hooks run when it ends, with its usage on the request
            self._after_stream(req, resp)
            return resp
        for hook in hooks:  # a WebSocket upgrade
            try:
                hook(req, resp)
            except Exception as e:
                self._hook_failed(req, self.after_owners[hooks.index(hook)], "after_response",
                                  hook, e)
        return resp

    def _after_stream(self, req: Request, resp: StreamingResponse) -> None:
        first = resp.on_close

        def on_close(cancelled: bool) -> None:
            if first is not None:
                first(cancelled)  # the generation reports its usage first
            for i, hook in enumerate(self.after_hooks):
                try:
                    hook(req, resp)
                except Exception as e:
                    self._hook_failed(req, self.after_owners[i], "after_response", hook, e)

        resp.on_close = on_close


class PluginRoute:
    """A plugin's route handler: what it raises or answers wrongly becomes a
    500 and one log line naming the plugin and the route (core handlers are
    not wrapped: this costs only on plugin routes)."""

    __slots__ = ("owner", "method", "path", "fn", "__qualname__")

    def __init__(self, owner: str, method: str, path: str, fn: Handler) -> None:
        self.owner = owner
        self.method = method
        self.path = path
        self.fn = fn
        self.__qualname__ = getattr(fn, "__qualname__", type(fn).__name__)

    def __call__(self, req: Request) -> Result:
        try:
            r = self.fn(req)
        except Exception as e:
            return self._failed(req, e)
        if inspect.isawaitable(r):
            return self._await(req, r)
        return self._checked(req, r)

    async def _await(self, req: Request, pending: Awaitable[Any]) -> Any:
        try:
            r = await pending
        except BodyError:
            raise  # its streamed body failed: the connection answers its status
        except Exception as e:
            return self._failed(req, e)
        return self._checked(req, r)

    def _failed(self, req: Request, e: Exception) -> Response:
        log.error("plugin %r: route %s %s (%s) failed: %s: %s", self.owner, self.method,
                  self.path, self.__qualname__, type(e).__name__, e, exc_info=e)
        return error_response(req, 500, "internal server error")

    def _checked(self, req: Request, r: Any) -> Any:
        problem = response_problem(r)
        if problem is None:
            return r
        log.error("plugin %r: route %s %s (%s) answered wrongly: %s", self.owner, self.method,
                  self.path, self.__qualname__, problem)
        return error_response(req, 500, "internal server error")
