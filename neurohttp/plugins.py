"""The plugin API (DESIGN §5a, docs/PLUGINS.md) and the loader.

A plugin is a module with `setup(app, options)`. `[plugins] paths` lists the
directories searched for `<name>.py` or `<name>/__init__.py` (relative paths
are relative to the working directory), `enabled` the plugins to load, in
order, and `[plugins.<name>]` is the `options` dict of one plugin. A name not
found in `paths` is imported as an installed module.

`app` is the plugin's own PluginApp: what it registers is marked as the
plugin's, so a route colliding with a core route, a hook that raises or an
answer built wrong is reported naming the plugin. A plugin may declare its
options' types (`OPTIONS`) and check their values (`validate(options)`):
pluginkit/options.py.

Plugins are loaded in each worker, after the fork, once its signal handlers
and heartbeat run (a slow setup() is not taken for a hung worker; one slower
than [plugins] setup_timeout fails the worker's start, naming the plugin), so
a reload (new workers) picks up changed plugin code, and a plugin that fails
at setup fails its worker's start: the master backs off and, if no worker
can start, exits showing the error. This API is kept stable: what is here
and in docs/PLUGINS.md is what plugins may rely on.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .ai.providers import Chunk, Delta, Finish, ProviderError, ToolCallDelta, Usage
from .app import App, Handler, Hook, RouteConflict
from .context import PLUGIN_MODULE_PREFIX, StatsReader, UsageEvent
from .errors import error_response
from .messages import BodyError, Request, Response, StreamingResponse
from .pluginkit.options import OptionError, check_options
from .pluginkit.state import Counter, Metric, Rate, StateRuntime, StateUnavailable, settle
from .pluginkit.timers import Timers
from .shared.store import Admission
from .upstream import ErrorKind, HeaderBlock, PoolLimits, Timeouts, UpstreamError

__all__ = ["Request", "Response", "StreamingResponse", "PluginError", "PluginApp",
           "load_plugins", "error_response", "OptionError", "Counter", "Rate", "Metric",
           "Admission", "StateUnavailable", "settle", "UsageEvent",
           # what a provider (app.add_provider) may yield besides text
           "Chunk", "Delta", "Finish", "ProviderError", "ToolCallDelta", "Usage",
           # a streamed body that cannot be read to its end (request.stream())
           "BodyError",
           # app.upstream, the worker's shared upstream client: its settings and errors
           "ErrorKind", "HeaderBlock", "PoolLimits", "Timeouts", "UpstreamError"]

log = logging.getLogger("neurohttp")


class PluginError(Exception):
    """A plugin could not be found or imported, its options are wrong, or its
    setup() failed."""


class PluginRuntime:
    """What a worker gives its plugins beyond the App: shared state, timers,
    figures, the server's stats and the loop. `neurohttpd check` makes one
    with no shared state (setup() runs; nothing is served)."""

    def __init__(self, state: StateRuntime | None = None) -> None:
        self.state = state or StateRuntime()
        self.timers = Timers()
        self.metrics: list[Metric] = []
        self.stats_reader: StatsReader | None = None  # set once the worker's services exist
        self.loop: asyncio.AbstractEventLoop | None = None

    def figures(self) -> dict[str, dict[str, int]]:
        """The plugins' figures, for /stats ("plugins") and /metrics."""
        out: dict[str, dict[str, int]] = {}
        for m in self.metrics:
            out.setdefault(m.plugin, {})[m.name] = m.value()
        return out

    def metric_kinds(self) -> dict[tuple[str, str], tuple[str, str]]:
        return {(m.plugin, m.name): (m.kind, m.help) for m in self.metrics}


class PluginApp:
    """What a plugin's setup(app, options) gets: the App's registration,
    marked as this plugin's, and the plugin API (docs/PLUGINS.md)."""

    def __init__(self, app: App, name: str, runtime: PluginRuntime,
                 options: dict[str, Any]) -> None:
        self._app = app
        self._rt = runtime
        self.name = name
        self.options = options
        self.log = logging.getLogger(f"neurohttp.plugin.{name}")

    # ------------------------------------------------------------ routes and hooks
    def add_route(self, method: str, path: str, handler: Handler, *,
                  stream_body: bool = False, max_upload_bytes: int = 0) -> None:
        self._app.add_route(method, path, handler, owner=self.name, stream_body=stream_body,
                            max_upload_bytes=max_upload_bytes)

    def route(self, method: str, path: str, *, stream_body: bool = False,
              max_upload_bytes: int = 0) -> Callable[[Handler], Handler]:
        """Decorator: `handler(request)` (def or async def) answers `method path`.
        stream_body: the handler gets the request once its head has arrived and
        reads the body with `async for piece in request.stream()` as the client
        sends it (an async handler), up to `max_upload_bytes` (0: [server]
        max_upload_bytes) instead of max_body_bytes."""
        def deco(fn: Handler) -> Handler:
            self.add_route(method, path, fn, stream_body=stream_body,
                           max_upload_bytes=max_upload_bytes)
            return fn
        return deco

    def add_mount(self, prefix: str, handler: Handler, *, methods: list[str] | None = None,
                  stream_body: bool = False, max_upload_bytes: int = 0) -> None:
        self._app.add_mount(prefix, handler, self.name, methods=methods,
                            stream_body=stream_body, max_upload_bytes=max_upload_bytes)

    def mount(self, prefix: str, *, methods: list[str] | None = None, stream_body: bool = False,
              max_upload_bytes: int = 0) -> Callable[[Handler], Handler]:
        """Decorator: `handler(request)` answers every path under `prefix` that
        no exact route takes ("/v1/files": /v1/files and /v1/files/...), for
        `methods` (None: all); stream_body and max_upload_bytes as for route()."""
        def deco(fn: Handler) -> Handler:
            self.add_mount(prefix, fn, methods=methods, stream_body=stream_body,
                           max_upload_bytes=max_upload_bytes)
            return fn
        return deco

    @property
    def upstream(self) -> Any:
        """The worker's shared upstream HTTP client (neurohttp.upstream
        UpstreamClient): `app.upstream.pool(base_url, limits=PoolLimits(...),
        timeouts=Timeouts(...))` gives a pooled, keep-alive client for an
        origin, shared by every plugin and provider of the worker, made after
        the fork and closed when the worker drains. None in `neurohttpd check`
        (take the pool when serving, not in setup)."""
        return self._app.upstream

    def before_request(self, fn: Hook) -> Hook:
        """`fn(request)` (def or async def) runs before routing, every hook in
        order; returning a Response answers the request at once."""
        return self._app.before_request(fn, owner=self.name)

    def after_response(self, fn: Hook) -> Hook:
        """`fn(request, response)` may change the response in place; for a
        stream it runs when the stream ends (request.usage is set by then)."""
        return self._app.after_response(fn, owner=self.name)

    def on_token(self, fn: Callable[[Request, str], str | None]) -> Callable[[Request, str], str | None]:
        """`fn(request, token)` returns the text to send; None stops the stream."""
        return self._app.on_token(fn, owner=self.name)

    def add_provider(self, name: str, factory: Callable[[dict], Any]) -> None:
        """`factory(model_options)` makes a provider for [models.*] provider = name."""
        self._app.add_provider(name, factory, owner=self.name)

    def on_startup(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`async def fn()` runs on the worker's loop before it serves (pools,
        clients); a failure fails the worker's start, naming the plugin."""
        self._app.startup.append((self.name, fn))
        return fn

    def on_shutdown(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`async def fn()` runs on the worker's loop after it drained."""
        self._app.shutdown.append((self.name, fn))
        return fn

    def on_reopen(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`fn()` runs on SIGUSR1 (log rotation), when the server reopens its
        log files: reopen the plugin's own files there."""
        self._app.reopen.append((self.name, fn))
        return fn

    # ------------------------------------------------------------ timers
    def every(self, seconds: float, fn: Callable[[], Any] | None = None, *,
              once_per_server: bool = False) -> Any:
        """Run `fn()` (def or async def) every `seconds`, at the multiples of
        `seconds` since the epoch; once_per_server: in one worker only per
        period (whichever takes the period's lease). Usable as a decorator."""
        if fn is None:
            def deco(f: Callable[[], Any]) -> Callable[[], Any]:
                self._rt.timers.add(self.name, seconds, f, once_per_server)
                return f
            return deco
        self._rt.timers.add(self.name, seconds, fn, once_per_server)
        return fn

    # ------------------------------------------------------------ shared state
    def counter(self, name: str) -> Counter:
        """An exact shared integer (add/get/set), across workers ([state] backend)."""
        return Counter(self._rt.state, self.name, name)

    def rate(self, name: str, per_s: float | None = None, *, per_minute: float | None = None,
             burst: int | None = None) -> Rate:
        """A token bucket per key refilled at `per_s` (or `per_minute / 60`) a
        second, holding `burst` (default: one second's worth, at least 1)."""
        if (per_s is None) == (per_minute is None):
            raise ValueError(f"rate {name!r}: give per_s or per_minute (one of them)")
        rate = per_s if per_s is not None else per_minute / 60  # type: ignore[operator]
        if burst is None:
            burst = max(1, int(rate))
        return Rate(self._rt.state, self.name, name, rate, burst)

    @property
    def state_backend(self) -> str:
        """"shm" (answers at once) or "redis" (answers are awaitables: `settle`)."""
        return self._rt.state.backend

    # ------------------------------------------------------------ figures
    def metric(self, name: str, kind: str = "counter", help: str = "") -> Metric:
        """A figure shown in /stats ("plugins": {plugin: {name: value}}) and
        /metrics (neurohttp_plugin_<plugin>_<name>, `_total` for counters)."""
        m = Metric(self._rt.state, self.name, name, kind, help)
        if any(x.plugin == m.plugin and x.name == m.name for x in self._rt.metrics):
            raise ValueError(f"metric {name!r} is declared twice")
        self._rt.metrics.append(m)
        return m

    def stats(self, start: int | None = None, end: int | None = None) -> dict[str, Any]:
        """The server's /stats document; with `start` and `end` (Unix seconds,
        within the last minute) its windowed figures cover start .. end-1."""
        reader = self._rt.stats_reader
        if reader is None:
            raise RuntimeError("app.stats() is only available while the worker serves")
        if start is None or end is None:
            return reader.document(reader.snapshot())
        return reader.interval(int(start), int(end))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop (run blocking work with loop.run_in_executor)."""
        loop = self._rt.loop
        if loop is None:
            raise RuntimeError("the loop is only available in a running worker")
        return loop


# ---------------------------------------------------------------- loading
def _find(name: str, paths: list[str]) -> str | None:
    for d in paths:
        for candidate in (os.path.join(d, f"{name}.py"), os.path.join(d, name, "__init__.py")):
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
    return None


def _import(name: str, paths: list[str]) -> ModuleType:
    path = _find(name, paths)
    if path is None:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise PluginError(f"plugin {name!r} not found in {paths} nor importable: {e}") from e
    modname = PLUGIN_MODULE_PREFIX + name
    spec = importlib.util.spec_from_file_location(
        modname, path, submodule_search_locations=[os.path.dirname(path)]
        if path.endswith("__init__.py") else None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(modname, None)
        raise PluginError(f"plugin {name!r} ({path}) failed to import: "
                          f"{type(e).__name__}: {e}") from e
    return module


def load_plugins(app: App, paths: list[str], enabled: list[str],
                 options: dict[str, dict[str, Any]], runtime: PluginRuntime | None = None,
                 where: str = "<config>", on_plugin: Callable[[str], None] | None = None
                 ) -> list[ModuleType]:
    """Import every enabled plugin, check its options, and run its
    setup(app, options); raise PluginError (naming the plugin and the cause)
    on the first failure. `on_plugin(name)` is told which plugin is loading
    (the worker's start watchdog names it if it takes too long)."""
    rt = runtime or PluginRuntime()
    loaded = []
    for name in enabled:
        if on_plugin is not None:
            on_plugin(name)
        module = _import(name, paths)
        setup = getattr(module, "setup", None)
        if not callable(setup):
            raise PluginError(f"plugin {name!r} has no setup(app, options) function")
        opts = dict(options.get(name, {}))
        problems = check_options(module, opts)
        if problems:
            raise PluginError("; ".join(f"{where}: plugins.{name}.{p} (plugin {name!r})"
                                        for p in problems))
        try:
            setup(PluginApp(app, name, rt, opts), opts)
        except RouteConflict as e:
            raise PluginError(str(e)) from e
        except OptionError as e:
            raise PluginError(f"{where}: plugins.{name}.{e.key}: {e.message} "
                              f"(plugin {name!r})") from e
        except Exception as e:
            raise PluginError(f"plugin {name!r} setup failed: {type(e).__name__}: {e}") from e
        log.debug("plugin %s loaded from %s", name, getattr(module, "__file__", name))
        loaded.append(module)
    return loaded


def load_configured(app: App, cfg: Any, runtime: PluginRuntime | None = None,
                    on_plugin: Callable[[str], None] | None = None) -> list[ModuleType]:
    """Load the plugins `cfg` enables into `app`, then check that every [models]
    provider is built in or added by one of them (config.ConfigError if not).
    The worker does this at start and `neurohttpd check` does the same."""
    from .config import check_providers
    loaded = load_plugins(app, cfg.plugins.paths, cfg.plugins.enabled, cfg.plugins.options,
                          runtime, cfg.path or "<defaults>", on_plugin)
    check_providers(cfg, app.providers)
    return loaded
