"""A worker process: an event loop serving HTTP on the sockets the master gave it.

It writes only its own stats slot, stamps a heartbeat there every tick, and
stops gracefully on SIGTERM (keep accepting for ACCEPT_LINGER so nothing queued
on a socket that is closing for good is reset, then stop accepting and finish
what is in flight within graceful_timeout) or at once on SIGINT/SIGQUIT.
SIGUSR2 (from the master, when the loop missed its heartbeat) logs the request
the loop is stuck on and the stack.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any

from .. import fdlimit, handlers
from ..ai.models import ModelRegistry
from ..app import App, RouteConflict
from ..config import Config
from ..context import Counters, Services, Settings, StatsReader, UsageSink
from ..logs import AccessLog
from ..master.sockets import accept_queue_length
from ..messages import Request, Response
from ..pluginkit.state import StateRuntime
from ..plugins import PluginError, PluginRuntime, load_configured
from ..protocol.serialize import clock
from ..protocol.settings import ConnectionSettings
from ..stats import layout as L
from ..stats.block import StatsBlock
from ..stats.window import Meter
from ..tlsconfig import server_kwargs
from ..upstream import UpstreamClient
from .acceptor import Gate
from .connection import HttpConnection, busy_response, count_refusal
from .host import Connection

log = logging.getLogger("neurohttp")

TICK = 0.5  # seconds between sweeps (timeouts), heartbeats and Date refreshes
# On a graceful stop a worker keeps accepting this long, then until its accept
# queues are empty (at most ACCEPT_LINGER_MAX): when its sockets are closing for
# good (fewer workers, a removed address, the server stopping) the master has
# already steered new connections away, and what is queued, or still finishing
# its handshake, must be served rather than reset.
ACCEPT_LINGER = 0.3
ACCEPT_LINGER_MAX = 2.0
CUT_FLUSH = 0.5  # after the drain deadline, how long cut streams get to send their last event
# The timeout sweep runs this long after the tick, so that the loop polls in between:
# after a stall (a handler that blocked the loop), requests that arrived meanwhile are
# read before the sweep would take their connections for idle. A sweep that itself
# runs more than SWEEP_LATE late (another stall) waits again, at most SWEEP_RETRIES times.
SWEEP_DELAY = 0.002
SWEEP_LATE = 0.1
SWEEP_RETRIES = 3


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop when asked for or available ("auto"), else asyncio's epoll selector loop."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                raise
    return asyncio.SelectorEventLoop()


class Worker:
    def __init__(self, cfg: Config, block: StatsBlock, slot_index: int, worker_id: int,
                 sockets: list[socket.socket], master_pid: int,
                 tls: list[ssl.SSLContext | None] | None = None) -> None:
        self.cfg = cfg
        self.block = block
        self.slot_index = slot_index
        self.slot = block.slot(slot_index)
        self.worker_id = worker_id
        self.sockets = sockets
        # per socket: the TLS context the master built before forking, or None (plain)
        self.tls = tls or [None] * len(sockets)
        self.master_pid = master_pid
        srv = cfg.server
        # what connections get instead of this Worker: their settings, and this
        # object as their host (worker/host.py ConnectionHost: register, forget,
        # handover, draining, app, slot, meter, access_log, loop)
        self.conn_settings = connection_settings(cfg)
        self.header_timeout = srv.header_timeout
        self.max_connections = fdlimit.connection_cap(srv.max_connections)
        self.graceful_timeout = srv.graceful_timeout
        self.backlog: int = srv.backlog
        self.loop_kind: str = srv.loop
        self.connections: set[Connection] = set()  # HTTP and WebSocket connections
        self.draining = False
        # accepts (and refuses when full) once the loop runs
        self.gate = Gate(worker_id, self.max_connections, lambda: len(self.connections),
                         lambda nbytes, t0: count_refusal(self, nbytes, t0))
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._stopped: asyncio.Future | None = None
        self.access_log: AccessLog | None = AccessLog(cfg.log.access_log) \
            if cfg.log.access_log else None
        self.app = App(block.geometry.routes)
        self.app.max_upload_bytes = srv.max_upload_bytes
        # The upstream client (pools per origin, this process's loop, made after
        # the fork): one per worker, shared by the openai models and the plugins
        # (app.upstream); closed after the drain and the on_shutdown hooks.
        self.upstream = self.app.upstream = UpstreamClient()
        # The plugins' shared state, timers and figures (plugins.py); the plugins
        # themselves load in build(), once the signal handlers and heartbeat run.
        self.plugins = PluginRuntime(plugin_state(cfg, block))
        self.setup_timeout = float(cfg.plugins.setup_timeout)
        self.models: ModelRegistry = None  # type: ignore[assignment]  # build()
        self.meter: Meter = None  # type: ignore[assignment]
        self.services: Services = None  # type: ignore[assignment]
        self.firewall: Any = None

    def build(self) -> None:
        """Load the plugins, then build what serves requests: the models (with
        the providers plugins add), the services, the core routes (a plugin
        route colliding with one is an error naming the plugin), the security."""
        cfg, block, slot_index = self.cfg, self.block, self.slot_index
        srv = cfg.server
        load_configured(self.app, cfg, self.plugins, on_plugin=self._loading)
        self._loading("")
        # their deployments' figures follow the models'
        from ..gateway import GatewayFigures, stat_names
        gw_figures = GatewayFigures(None, block.state.named)
        self.models = ModelRegistry(cfg.models, self.app.providers, self.upstream, gw_figures,
                                    block.router, slot_index)
        # windowed + per-model figures, for the routes the App numbers
        public = self.models.names()
        deps = self.models.deployments()
        routes = self.models.routes  # (its table: the block's, or its own when unassigned)
        self.meter = Meter(self.slot, stat_names(public, deps, routes and routes.table,
                                                 block.geometry),
                           block.geometry, self.app.route_names)
        gw_figures.meter = self.meter
        # What handlers and the pipeline get instead of this Worker (context.py).
        counters = Counters(self.slot, self.meter)
        self.services = Services(
            settings=Settings(sse_ping_s=float(srv.sse_ping_s),
                              stats_allow=tuple(cfg.stats.allow),
                              cache_max_entries=cfg.cache.max_entries,
                              cache_max_bytes=cfg.cache.max_bytes),
            models=self.models, counters=counters, meter=self.meter,
            stats=StatsReader(block, self.app.route_names,
                              self.meter.model_names[:1 + len(public)]),
            clock=clock, usage=UsageSink(counters), filters=self.app.token_filters)
        try:
            self.pipeline = handlers.register(self.app, self.services)
        except RouteConflict as e:
            raise PluginError(str(e)) from None
        self.plugins.stats_reader = self.services.stats
        if deps:  # /stats "deployments" (gateway/figures.py)
            from ..gateway.figures import deployments_section
            self.services.stats.add_section("deployments", deployments_section(
                block, self.meter.model_names, deps, block.state.named))
        if self.plugins.metrics:
            from ..stats.prometheus import plugin_metrics_text
            plugins = self.plugins
            self.services.stats.add_section("plugins", plugins.figures)
            self.services.stats.metric_texts.append(
                lambda doc: plugin_metrics_text(doc.get("plugins", {}), plugins.metric_kinds()))
        # The firewall ([firewall]; None when it sets no rule): register/forget
        # consult it at accept and close, the admission step its request rules.
        from ..security import build_firewall, build_gate
        from ..security.firewall import figures as firewall_figures
        fw = build_firewall(cfg, block.state, slot_index)
        self.firewall = fw if fw is not None and fw.at_accept else None
        named = block.state.named
        self.services.stats.add_section("firewall", lambda: firewall_figures(named.get))
        if self.models.routes is not None:  # per deployment: breaker, outstanding, retries, ...
            self.services.stats.add_section("router", self.models.routes.figures)
        if cfg.auth.enabled or (fw is not None and fw.at_request):
            # the admission step: firewall rules, keys, models, quotas (security/)
            gate = self.app.gate = build_gate(cfg, block.state, self.models.default,
                                              fw if fw is not None and fw.at_request else None)
            gate.metered = self.app.mounted  # mounts' requests count against a key's rpm
            if cfg.auth.enabled:
                self.services.usage.subscribe(gate)  # tpm and the day charged as tokens stream
                self.services.stats.add_section(
                    "auth", lambda: gate.figures(named.get))

    def _loading(self, plugin: str) -> None:
        self._plugin_loading = plugin

    async def _start_watched(self) -> None:
        """build() and the plugins' on_startup hooks, with the heartbeat stamped
        from a thread meanwhile (a plugin's setup() may block the loop for a
        while: that is not a hung worker), bounded by [plugins] setup_timeout:
        past it the worker logs the plugin it was loading and exits (the
        master backs off and retries, as for any failed start)."""
        done = threading.Event()
        self._plugin_loading = ""
        stage = ["setup"]

        def watch() -> None:
            deadline = time.monotonic() + self.setup_timeout
            while not done.wait(TICK):
                if time.monotonic() > deadline:
                    plugin = self._plugin_loading
                    what = (f"plugin {plugin!r} {stage[0]} took longer than [plugins] "
                            f"setup_timeout ({self.setup_timeout:g} s)" if plugin else
                            f"starting took longer than [plugins] setup_timeout "
                            f"({self.setup_timeout:g} s)")
                    self.block.write_text(self.slot_index, what)
                    log.error("worker %d (pid %d): %s; exiting", self.worker_id, os.getpid(), what)
                    sys.stderr.flush()
                    os._exit(1)
                self.slot[L.S_HEARTBEAT] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000

        watcher = threading.Thread(target=watch, name="plugin-setup-watch", daemon=True)
        watcher.start()
        try:
            self.build()
            stage[0] = "on_startup"
            for owner, fn in self.app.startup:
                self._plugin_loading = owner
                try:
                    await fn()
                except Exception as e:
                    raise PluginError(f"plugin {owner!r} on_startup hook "
                                      f"{getattr(fn, '__qualname__', fn)} failed: "
                                      f"{type(e).__name__}: {e}") from e
            self._plugin_loading = ""
        finally:
            done.set()
            watcher.join()

    # ------------------------------------------------------------ lifecycle
    def run(self) -> int:
        self.loop = new_event_loop(self.loop_kind)
        asyncio.set_event_loop(self.loop)
        try:
            return self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> int:
        loop = self.loop
        self._stopped = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.begin_drain)
        for sig in (signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, self.quick_exit)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        # A plain handler, not the loop's: it must run while the loop is blocked.
        signal.signal(signal.SIGUSR2, self._dump_stuck)
        for sig in (signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)  # meant for the master; default would stop us
        self.plugins.loop = loop
        await self._start_watched()
        settings = self.conn_settings
        await self.gate.listen(loop, self.sockets, lambda: HttpConnection(settings, self),
                               self.backlog,
                               [server_kwargs(ctx, self.header_timeout) for ctx in self.tls])
        s = self.slot
        s[L.S_PID] = os.getpid()
        s[L.S_STATE] = L.STATE_READY
        self._tick()
        self.plugins.timers.start(loop, self.block.state.named)
        log.debug("worker %d (pid %d) ready", self.worker_id, os.getpid())
        await self._stopped
        drain_start = time.monotonic()
        await self._drain()
        await self._shutdown_hooks(drain_start + self.graceful_timeout + CUT_FLUSH)
        self.upstream.close()  # after its users: requests drained, on_shutdown hooks run
        if self.access_log is not None:
            self.access_log.flush()
        return 0

    async def _shutdown_hooks(self, deadline: float) -> None:
        """The plugins' timers' last runs and on_shutdown hooks, until `deadline`
        (the master kills a draining worker KILL_GRACE after graceful_timeout)."""
        await self.plugins.timers.wait_running(deadline - time.monotonic())
        for owner, fn in self.app.shutdown:
            try:
                async with asyncio.timeout(max(0.05, deadline - time.monotonic())):
                    await fn()
            except Exception as e:
                log.error("plugin %r: on_shutdown hook %s failed: %s: %s", owner,
                          getattr(fn, "__qualname__", fn), type(e).__name__, e, exc_info=e)

    def _tick(self) -> None:
        """Heartbeat, Date refresh and timeout sweep, every TICK seconds."""
        now_wall = time.time()
        clock.tick(now_wall)
        self.meter.tick(now_wall)
        self.slot[L.S_HEARTBEAT] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000
        if self.access_log is not None:
            self.access_log.flush()
        self.loop.call_later(SWEEP_DELAY, self._sweep, time.monotonic() + SWEEP_DELAY, 0)
        self.gate.tick()
        if os.getppid() != self.master_pid and not self.draining:
            log.warning("worker %d: master %d is gone, stopping", self.worker_id, self.master_pid)
            self.begin_drain()
        # wake just after the next half-second boundary so Date is never a second stale
        delay = TICK - (now_wall % TICK) + 0.001
        self.loop.call_later(delay, self._tick)

    def _sweep(self, due: float, retries: int) -> None:
        """Check every connection's timeouts, once the I/O that waited behind any
        stall has been handled (see SWEEP_DELAY)."""
        now = time.monotonic()
        if now - due > SWEEP_LATE and retries < SWEEP_RETRIES:
            self.loop.call_later(SWEEP_DELAY, self._sweep, now + SWEEP_DELAY, retries + 1)
            return
        for conn in list(self.connections):
            try:
                conn.check_timeouts(now)
            except Exception:
                log.exception("timeout check failed")

    def begin_drain(self) -> None:
        """Answer everything with Connection: close from now on; _drain then
        stops accepting and lets in-flight requests and streams finish."""
        if self.draining:
            return
        self.draining = True
        self.slot[L.S_STATE] = L.STATE_DRAINING
        self.plugins.timers.stop()
        for conn in list(self.connections):
            conn.shutdown()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def _drain(self) -> None:
        start = time.monotonic()
        await asyncio.sleep(ACCEPT_LINGER)
        while (any(accept_queue_length(s) for s in self.sockets if s.fileno() >= 0)
               and time.monotonic() - start < ACCEPT_LINGER_MAX):
            await asyncio.sleep(0.02)
        self.gate.close()
        deadline = start + self.graceful_timeout
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                conn.shutdown()  # (idle ones close at their timeout: see HttpConnection)
            await asyncio.sleep(0.05)
        if self.connections:
            # Streams still running: end each with a final error event (OpenAI's
            # shape) and a proper end of body instead of a reset, then give those
            # bytes a moment to leave (the master kills at graceful_timeout + 1 s).
            for conn in list(self.connections):
                conn.cut()
            flush_until = time.monotonic() + CUT_FLUSH
            while self.connections and time.monotonic() < flush_until:
                await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        await asyncio.sleep(0)

    # ------------------------------------------------------------ connections' host
    def register(self, conn: Connection, peer: str) -> Response | None:
        self.connections.add(conn)
        n = len(self.connections)
        self.gate.opened(n)  # at the cap: the acceptors refuse from now on
        if n > self.max_connections:
            return busy_response()  # accepted before the acceptors switched: refused too
        if self.firewall is not None:  # [firewall]: the peer's address rules, per-IP cap
            return self.firewall.on_accept(peer, conn.transport)
        return None

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.firewall is not None:
            self.firewall.on_close(conn.transport)  # its per-IP count, if it had one
        self.gate.released(len(self.connections))

    def handover(self, old: Connection, new: Connection) -> None:
        self.connections.discard(old)
        self.connections.add(new)

    def reopen_logs(self) -> None:
        from .. import logs
        logs.reopen()
        if self.access_log is not None:
            self.access_log.reopen()
        for owner, fn in self.app.reopen:
            try:
                fn()
            except Exception as e:
                log.error("plugin %r: on_reopen hook %s failed: %s: %s", owner,
                          getattr(fn, "__qualname__", fn), type(e).__name__, e, exc_info=e)

    def quick_exit(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()
        os._exit(0)

    def _dump_stuck(self, signum: int, frame: FrameType | None) -> None:
        """The master saw no heartbeat: say which request the loop is stuck on
        (the innermost frame holding a Request) and where, then wait for SIGKILL."""
        req = None
        f = frame
        while f is not None and req is None:
            for v in f.f_locals.values():
                if isinstance(v, Request):
                    req = v
                    break
            f = f.f_back
        where = (f"{req.method} {req.path} from {req.client}" if req is not None
                 else "no request (outside any handler)")
        # the innermost frames: the handler and what the loop called it from
        stack = "".join(traceback.format_stack(frame, limit=12)) if frame is not None else ""
        self.block.write_text(self.slot_index, f"stuck on {where}")
        log.error("worker %d (pid %d) loop blocked, stuck on %s; stack:\n%s",
                  self.worker_id, os.getpid(), where, stack.rstrip())
        sys.stderr.flush()


def plugin_state(cfg: Config, block: StatsBlock) -> StateRuntime:
    """The plugins' shared state over [state]'s backend (Redis only when set)."""
    st = cfg.state
    redis = None
    if st.backend == "redis":
        from ..shared.redis_store import RedisStore, connect
        redis = RedisStore(connect(st.url, st.timeout_ms / 1000))
    return StateRuntime(block.state.named, block.state.open, redis, st.timeout_ms / 1000,
                        st.on_redis_error == "fail_open", cfg.plugins.max_state_keys)


def connection_settings(cfg: Config) -> ConnectionSettings:
    """[server]'s limits and timeouts, as connections take them."""
    srv = cfg.server
    return ConnectionSettings(
        max_header_bytes=srv.max_header_bytes, max_body_bytes=srv.max_body_bytes,
        header_timeout=srv.header_timeout, body_timeout=srv.body_timeout,
        keepalive_timeout=srv.keepalive_timeout, send_timeout=srv.send_timeout,
        request_timeout=srv.request_timeout, max_pipeline=srv.max_pipeline,
        write_buffer_bytes=srv.write_buffer_bytes, ws_ping_s=srv.ws_ping_s,
        ws_idle_timeout=srv.ws_idle_timeout)


def run_worker(cfg: Config, block: StatsBlock, slot_index: int, worker_id: int,
               sockets: list[socket.socket], master_pid: int,
               tls: list[ssl.SSLContext | None] | None = None) -> int:
    """Entry point in the forked child; returns the exit status."""
    try:
        from setproctitle import setproctitle
        setproctitle(f"neurohttpd: worker {worker_id}")
    except ImportError:
        pass
    try:
        worker = Worker(cfg, block, slot_index, worker_id, sockets, master_pid, tls)
        return worker.run()
    except Exception as e:
        log.exception("worker %d failed", worker_id)
        # for the master, which shows it if no worker can start
        block.write_text(slot_index, f"{type(e).__name__}: {e}")
        sys.stderr.flush()
        return 1
