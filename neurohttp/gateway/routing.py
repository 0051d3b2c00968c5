"""The router's engine: which deployment an attempt goes to, retries, hedges
and fallbacks, until the first event of an answer (docs/ROUTING.md, "Router").

`Routes.stream(model, attempt)` is an async iterator of the provider events
of one request. `attempt(deployment)` starts the request on one deployment:
an async iterator of provider events that raises (or yields first) a
ProviderError when the deployment fails before its answer begins. Until the
first event comes, a failure that another deployment may not share
(connect errors, timeouts, 429, 5xx) is retried on another deployment of
the model, `retries` times at most and within the model's retry budget;
then each of `fallbacks`, as its own model, in order. A deployment inside
its upstream's Retry-After, or whose breaker is open, is skipped. Once the
first event has been handed on nothing is retried: a later failure goes to
the caller as it is (the pipeline ends the stream with an error event).

With `hedge_after_ms`, when the first event has not come that long after an
attempt began, the same request also goes to another deployment; the first
to answer wins and the other attempt is cancelled (its async iterator is
closed, so its upstream connection is).

Every decision reads or writes the deployments' shared records
(gateway/breaker.py, gateway/budget.py), so every worker sees the same
breakers, outstanding requests, latencies and budgets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
import time
import types
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from ..ai.providers import ProviderError
from ..shared import deployments as D
from ..shared.mutex import buffer_address
from .breaker import PROBE, READY, DeploymentState
from .budget import RetryBudget
from .policy import Strategy, make_strategy

log = logging.getLogger("neurohttp")
_mono_ns = time.monotonic_ns  # (µs of it: shared/deployments.py now_us, inlined)

Attempt = Callable[[Any], AsyncIterator[Any]]
# the attempt of the same request to another public model (None: not served here)
Fallback = Callable[[str], "Attempt | None"]

# model and deployment keys the router reads, and their defaults (config.py
# checks them; the router does not fail on a table that lacks one)
DEFAULTS: dict[str, Any] = {
    "strategy": "round_robin", "retries": 0, "fallbacks": [], "hedge_after_ms": 0,
    "retry_budget": 0.2, "weight": 1, "breaker_failures": 5, "breaker_cooldown_s": 10.0,
    "connect_timeout_s": 3.0, "first_byte_timeout_s": 60.0,
}

# ProviderError kinds (gateway/errors.py) after which another deployment may
# do better: connect errors, timeouts, 429 and 503; and `upstream_error` when
# it is a 5xx or a broken answer (no status), not the upstream's 401/403/404,
# which says the request or the config is at fault
RETRYABLE = frozenset({"upstream_unreachable", "upstream_timeout", "upstream_unavailable",
                       "rate_limited"})
# ... and those that count against a deployment's breaker (a 429 does not:
# the upstream is alive, and said when to come back)
BREAKER_FAILURES = frozenset({"upstream_unreachable", "upstream_timeout",
                              "upstream_unavailable"})


def _broken(e: ProviderError) -> bool:
    return e.kind == "upstream_error" and (e.status is None or e.status >= 500)


def retryable(e: ProviderError) -> bool:
    return e.kind in RETRYABLE or _broken(e)


def _next(route: Any, tried: set[int], started: int, last: ProviderError | None,
          now: int) -> tuple[int, ProviderError | None]:
    """The deployment to try next, or -1 to stop, and the error to answer with
    then: no more than `retries` retries, none after an error that is not
    retryable, none the shared budget refuses, and -1 when every deployment
    is out (tried, breaker open, Retry-After)."""
    if started > route.retries or (last is not None and not retryable(last)):
        return -1, last
    if started and not route.budget.spend(now):
        return -1, last  # the budget says no more retries now
    i = route.pick(tried, now)
    if i < 0:
        if started:
            route.budget.refund()
        if last is None:
            last = route.unavailable(now)
    return i, last


def counts_against(e: ProviderError) -> bool:
    return e.kind in BREAKER_FAILURES or _broken(e)


def _opt(table: Mapping[str, Any], key: str) -> Any:
    return table.get(key, DEFAULTS[key])


class ModelRoute:
    """One public model in one worker: its deployments (opaque objects handed
    to `attempt`, in the order of the config's deployment tables), their
    shared states, its strategy and its retry budget."""

    __slots__ = ("name", "deployments", "states", "strategy", "retries", "fallbacks",
                 "hedge_s", "budget", "names", "measure")

    def __init__(self, name: str, table: Mapping[str, Any], deployments: Sequence[Any],
                 states: list[DeploymentState], budget: RetryBudget) -> None:
        self.name = name
        self.deployments = list(deployments)
        self.states = states
        tables = table.get("deployments") or [table]
        strategy = str(_opt(table, "strategy"))
        self.strategy: Strategy = make_strategy(strategy, [int(_opt(t, "weight")) for t in tables])
        self.measure = strategy == "lowest_latency"  # the TTFB EWMA: only its reader pays for it
        self.retries = int(_opt(table, "retries"))
        self.fallbacks: list[str] = list(_opt(table, "fallbacks"))
        self.hedge_s = float(_opt(table, "hedge_after_ms")) / 1000.0
        self.budget = budget
        self.names = [str(i) for i in range(len(tables))]
        for s, d in zip(states, self.deployments, strict=False):
            s.name = getattr(d, "log_name", None)

    def pick(self, tried: set[int], now: int, others_only: bool = False) -> int:
        """The deployment for the next attempt, or -1. A deployment whose
        breaker may be probed goes first (if this request gets the probe);
        then the strategy chooses among the ready ones not tried yet, or, with
        none left, among the ready ones tried (unless `others_only`)."""
        states = self.states
        if len(states) == 1 and not tried:  # one deployment (most models): no strategy
            st = states[0].state(now)
            return 0 if st == READY or (st == PROBE and states[0].claim_probe(now)) else -1
        ready: list[int] = []
        for i, s in enumerate(states):
            st = s.state(now)
            if st == READY:
                if i not in tried:
                    ready.append(i)
            elif st == PROBE and i not in tried and s.claim_probe(now):
                return i
        if not ready and not others_only:
            ready = [i for i in tried if states[i].state(now) == READY]
        if not ready:
            return -1
        return ready[0] if len(ready) == 1 else self.strategy.pick(states, ready, now)

    def unavailable(self, now: int) -> ProviderError:
        """The error when no deployment may be tried: 429 (an upstream's own
        429 said so) or 503, with the Retry-After of the first to come back."""
        first = min(self.states, key=DeploymentState.available_at)
        wait = max(1, math.ceil((first.available_at() - now) / 1e6))
        kind = "rate_limited" if first.limited_status(now) == 429 else "upstream_unavailable"
        return ProviderError(kind, f"model {self.name!r}: no deployment available "
                             f"(retry after {wait} s)", retry_after=float(wait))


class _Running:
    """One attempt in flight: its deployment, iterator and the task waiting
    for its first event (None when awaited inline: no hedging)."""

    __slots__ = ("index", "state", "it", "task", "t0")

    def __init__(self, index: int, state: DeploymentState, it: AsyncIterator[Any],
                 task: asyncio.Task[Any] | None, t0: int) -> None:
        self.index = index
        self.state = state
        self.it = it
        self.task = task
        self.t0 = t0


EMPTY = object()  # an attempt that ended without any event
_AsyncGen = types.AsyncGeneratorType


async def _first_event(it: AsyncIterator[Any]) -> Any:
    try:
        item = await it.__anext__()
    except StopAsyncIteration:
        return EMPTY
    if isinstance(item, ProviderError):
        raise item  # an error yielded before the answer began is a failed attempt
    return item


class _Routed:
    """The events of one routed request (Routes.stream): the first from
    `Routes.begin` (retries, hedges, fallbacks), then the winning attempt's
    events passed through, nothing retried. A class, not an async generator:
    no per-request registration with the loop's async-generator hooks, one
    frame per event. Closing it (or losing it) closes the attempt and ends
    the deployment's outstanding request once. A consumer must close it if
    it stops before the end (the pipeline does, as for any provider): a
    `__del__` safety net would cost every request ~4k instructions."""

    __slots__ = ("routes", "model", "attempt", "fallback", "it", "state", "ended")

    def __init__(self, routes: Routes, model: str, attempt: Attempt,
                 fallback: Fallback | None) -> None:
        self.routes = routes
        self.model = model
        self.attempt: Attempt | None = attempt
        self.fallback = fallback
        self.it: AsyncIterator[Any] | None = None
        self.state: DeploymentState | None = None
        self.ended = False

    def __aiter__(self) -> _Routed:
        return self

    async def __anext__(self) -> Any:
        it = self.it
        if it is None:
            if self.ended:
                raise StopAsyncIteration
            attempt = self.attempt
            assert attempt is not None
            self.attempt = None
            routes = self.routes
            alone = routes.alone.get(self.model)
            try:
                if alone is not None:  # no fallback, no hedge: one coroutine less
                    try:
                        first, self.state, self.it = await routes._first_serial(alone, attempt)
                    except ProviderError:
                        alone.budget.failed()
                        raise
                else:
                    first, self.state, self.it = await routes.begin(
                        self.model, attempt, self.fallback)
            except BaseException:
                self.ended = True
                raise
            if first is EMPTY:
                self._end()
                raise StopAsyncIteration
            return first
        try:
            item = await it.__anext__()
        except StopAsyncIteration:
            self._end()
            if it.__class__ is _AsyncGen:  # ended: nothing left for aclose() to close
                self.it = None
            raise
        except ProviderError as e:
            if counts_against(e):  # cut mid-answer: the deployment's fault
                self.state.failure(_mono_ns() // 1000)  # type: ignore[union-attr]
            self._end()
            raise
        except BaseException:
            self._end()
            raise
        if isinstance(item, ProviderError) and counts_against(item):
            self.state.failure(_mono_ns() // 1000)  # type: ignore[union-attr]
        return item

    @property
    def served_by(self) -> str | None:
        """The deployment whose answer this is (its log name), once one began."""
        state = self.state
        return state.name if state is not None else None

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.state is not None:
                self.state.end()

    async def aclose(self) -> None:
        it = self.it
        self._end()
        if it is not None:
            self.it = None
            await _aclose(it)



class Routes:
    """Every model's route in one worker, and the engine."""

    def __init__(self, routes: dict[str, ModelRoute], table: D.DeploymentTable) -> None:
        self.routes = routes
        self.table = table
        # public name -> provider, for fallbacks to models of other providers (echo)
        self.providers: Mapping[str, Any] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        # per model: the models a request tries in order (itself, then its
        # fallbacks, depth first, each once)
        self.chains: dict[str, list[ModelRoute]] = {m: self._chain(m) for m in routes}
        # models whose requests take the serial path alone (no fallback, no hedge)
        self.alone = {m: c[0] for m, c in self.chains.items() if len(c) == 1 and not c[0].hedge_s}

    def _chain(self, model: str) -> list[ModelRoute]:
        out: list[ModelRoute] = []
        seen: set[str] = set()

        def visit(m: str) -> None:
            r = self.routes.get(m)
            if r is None or m in seen:
                return
            seen.add(m)
            out.append(r)
            for f in r.fallbacks:
                visit(f)

        visit(model)
        return out

    def fallback_for(self, messages: Any, params: Any, whole: bool) -> Fallback:
        """Attempts of this request (`messages`, `params`; `whole`: not streamed)
        to other models: an `openai` model's own attempt (OpenAIProvider.attempt),
        or the stream of another provider (its one pseudo-deployment)."""
        def attempt_for(model: str) -> Attempt | None:
            p = self.providers.get(model)
            if p is None:
                return None
            make = getattr(p, "attempt", None)
            if make is not None:
                return make(messages, params, whole)
            return lambda _dep: aiter(p.stream(messages, params))
        return attempt_for

    # ------------------------------------------------------------ building
    @classmethod
    def build(cls, models: Mapping[str, Mapping[str, Any]],
              deployments: Mapping[str, Sequence[Any]],
              table: D.DeploymentTable | None = None, slot: int = 1) -> Routes:
        """The routes of a config's `[models.*]` (`deployments[name]`: the
        deployment objects of model `name`, in order) on the block's router
        table as stats slot `slot`; without a table (tests, tools), on a
        private one, so the state is this process's alone."""
        model_fps, dep_fps = D.config_fingerprints(dict(models))  # type: ignore[arg-type]
        if table is not None and any(table.find(fp) < 0 for fp in
                                     (*model_fps.values(), *dep_fps.values())):
            # a block no master assigned (a benchmark's, a tool's): this process's own state
            log.warning("the router's shared records are not assigned for this config: "
                        "its state is this worker's alone")
            table = None
        if table is None:
            table = private_table(model_fps, dep_fps)
        lease_default = float(DEFAULTS["connect_timeout_s"]) + float(DEFAULTS["first_byte_timeout_s"])
        routes: dict[str, ModelRoute] = {}
        for name, mtable in models.items():
            tables = mtable.get("deployments") or [mtable]
            states: list[DeploymentState] = []
            for i, dt in enumerate(tables):
                index = table.find(dep_fps[(name, i)])
                if index < 0:
                    raise RuntimeError(f"models.{name}: deployment {i} has no router record "
                                       f"(the master assigns them before forking)")
                lease = (float(dt.get("connect_timeout_s", DEFAULTS["connect_timeout_s"]))
                         + float(dt.get("first_byte_timeout_s", lease_default)))
                states.append(DeploymentState(
                    table, index, slot, int(_opt(dt, "breaker_failures")),
                    float(_opt(dt, "breaker_cooldown_s")), lease))
            mindex = table.find(model_fps[name])
            if mindex < 0:
                raise RuntimeError(f"models.{name} has no router record")
            budget = RetryBudget(table, mindex, slot, float(_opt(mtable, "retry_budget")))
            routes[name] = ModelRoute(name, mtable, deployments.get(name) or [None] * len(tables),
                                      states, budget)
        return cls(routes, table)

    # ------------------------------------------------------------ the engine
    def stream(self, model: str, attempt: Attempt,
               fallback: Fallback | None = None) -> AsyncIterator[Any]:
        """The events of one request to public model `model` (see the module's doc)."""
        return _Routed(self, model, attempt, fallback)

    async def begin(self, model: str, attempt: Attempt, fallback: Fallback | None
                    ) -> tuple[Any, DeploymentState, AsyncIterator[Any]]:
        """The first event of a request: the model's deployments, then its
        fallbacks, until one answers: (the event, its deployment's state, the
        attempt's iterator). Raises the last ProviderError when all fail."""
        chain = self.chains[model]
        route = chain[0]
        error: ProviderError | None = None
        for n, r in enumerate(chain):
            if n:
                a = fallback(r.name) if fallback is not None else None
                if a is None:
                    continue
                attempt = a
                route.budget.fallback()
                log.info("model %s: falling back to %s", route.name, r.name)
            try:
                if r.hedge_s:
                    return await self._first(r, attempt)
                return await self._first_serial(r, attempt)
            except ProviderError as e:
                error = e
                if not retryable(e):
                    break  # the request itself is at fault: no fallback does better
        route.budget.failed()
        assert error is not None
        raise error

    async def _first_serial(self, route: ModelRoute, attempt: Attempt
                            ) -> tuple[Any, DeploymentState, AsyncIterator[Any]]:
        """`_first` without hedging: one attempt at a time, its first event
        awaited inline (no task: this is every request's path)."""
        route.budget.request()
        tried: set[int] = set()
        started = 0
        last: ProviderError | None = None
        while True:
            now = _mono_ns() // 1000
            i, last = _next(route, tried, started, last, now)
            if i < 0:
                break
            s = route.states[i]
            s.begin(started > 0, False)
            tried.add(i)
            started += 1
            try:
                it = aiter(attempt(route.deployments[i]))
            except BaseException:
                s.end()
                raise
            try:
                first = await it.__anext__()
                if isinstance(first, ProviderError):
                    raise first  # an error yielded before the answer began: a failed attempt
            except StopAsyncIteration:
                first = EMPTY
            except ProviderError as e:
                s.end()
                self._failed(route, i, s, e)
                last = e
                continue
            except BaseException:  # cancelled (the client left), or a provider's bug
                s.end()
                self._close_later(it)
                raise
            if route.measure:
                t = _mono_ns() // 1000
                s.measured(t - now, t)
            s.success()
            return first, s, it
        assert last is not None
        raise last

    def _failed(self, route: ModelRoute, i: int, state: DeploymentState,
                e: ProviderError) -> None:
        """An attempt failed before its first event: its Retry-After, its breaker."""
        now = D.now_us()
        if e.retry_after and e.kind in ("rate_limited", "upstream_unavailable"):
            state.retry_after(e.retry_after, e.status or 429, now)
        if counts_against(e):
            state.failure(now)
        log.info("model %s deployment %d failed before its answer: %s (%s)",
                 route.name, i, e.message, e.kind)

    async def _first(self, route: ModelRoute, attempt: Attempt
                     ) -> tuple[Any, DeploymentState, AsyncIterator[Any]]:
        """Attempts on `route`'s deployments until one yields its first event:
        (that event, its attempt). Raises the last ProviderError when the
        retries, the budget or the deployments run out."""
        route.budget.request()
        loop = asyncio.get_running_loop()
        live: dict[asyncio.Task[Any], _Running] = {}
        tried: set[int] = set()
        started = 0
        hedged = False
        last: ProviderError | None = None

        def start(i: int, retry: bool, hedge: bool) -> None:
            s = route.states[i]
            s.begin(retry, hedge)
            tried.add(i)
            try:
                it = aiter(attempt(route.deployments[i]))
            except BaseException:
                s.end()
                raise
            task = loop.create_task(_first_event(it))
            live[task] = _Running(i, s, it, task, D.now_us())

        try:
            while True:
                if not live:
                    i, last = _next(route, tried, started, last, D.now_us())
                    if i < 0:
                        break
                    start(i, retry=started > 0, hedge=False)
                    started += 1
                timeout = None
                if route.hedge_s and not hedged:
                    run = next(iter(live.values()))
                    timeout = max(0.0, run.t0 / 1e6 + route.hedge_s - D.now_us() / 1e6)
                done, _ = await asyncio.wait(live, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    hedged = True
                    now = D.now_us()
                    if route.budget.spend(now, hedge=True):
                        i = route.pick(tried, now, others_only=True)
                        if i >= 0:
                            start(i, retry=False, hedge=True)
                        else:
                            route.budget.refund(hedge=True)
                    continue
                for task in done:
                    run = live.pop(task)
                    exc = task.exception()
                    if exc is None:
                        now = D.now_us()
                        if route.measure:
                            run.state.measured(now - run.t0, now)
                        run.state.success()
                        return task.result(), run.state, run.it
                    run.state.end()
                    self._close_later(run.it)
                    if not isinstance(exc, ProviderError):
                        raise exc
                    last = exc
                    self._failed(route, run.index, run.state, exc)
        finally:
            for run in live.values():  # losers, or the request went away
                assert run.task is not None
                run.task.cancel()
                run.state.end()
                self._close_later(run.it, run.task)
        assert last is not None
        raise last

    def _close_later(self, it: AsyncIterator[Any], task: asyncio.Task[Any] | None = None) -> None:
        """Close an attempt's iterator (its upstream connection) once its
        first-event task has ended, without holding up the winner."""
        async def close() -> None:
            if task is not None:
                try:
                    await task
                except BaseException:  # noqa: BLE001 - it was cancelled or failed
                    pass
            await _aclose(it)
        t = asyncio.get_running_loop().create_task(close())
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------ figures
    def figures(self) -> dict[str, Any]:
        """The /stats "router" section: per model and per deployment, summed
        over every worker (the shared records)."""
        t = self.table
        out: dict[str, Any] = {}
        for name, r in self.routes.items():
            head, cols = t.figures(r.budget.index)
            deps = []
            for i, s in enumerate(r.states):
                dh, dc = t.figures(s.index)
                deps.append({
                    "deployment": r.names[i],
                    "origin": getattr(r.deployments[i], "origin", ""),
                    "outstanding": dc[D.C_OUTSTANDING], "requests": dc[D.C_REQUESTS],
                    "errors": dc[D.C_ERRORS], "retries": dc[D.C_RETRIES],
                    "hedges": dc[D.C_HEDGES],
                    "breaker": D.STATE_NAMES[dh[D.R_BR_STATE]],
                    "breaker_opened": dh[D.R_BR_OPENED], "breaker_probes": dh[D.R_BR_PROBES],
                    "breaker_closed": dh[D.R_BR_CLOSED],
                    "ttfb_ms": round(dh[D.R_TTFB_US] / 1000, 3),
                })
            out[name] = {"requests": cols[D.C_REQUESTS], "failed": cols[D.C_ERRORS],
                         "retries": cols[D.C_RETRIES], "hedges": cols[D.C_HEDGES],
                         "fallbacks": cols[D.C_FALLBACKS],
                         "retries_refused": head[D.R_BUD_REFUSED], "deployments": deps}
        return out


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - closing a failed attempt: nothing more to do
            pass


def private_table(model_fps: Mapping[str, int],
                  dep_fps: Mapping[tuple[str, int], int]) -> D.DeploymentTable:
    """A router table of this process alone (no block: tests, tools)."""
    n = len(model_fps) + len(dep_fps)
    m = mmap.mmap(-1, D.area_words(n, 2) * 8)
    buf = memoryview(m)
    D.DeploymentTable.init(buf.cast("q"), buffer_address(buf), n, 2)
    t = D.DeploymentTable(buf.cast("q"), buffer_address(buf))
    t.assign([(fp, D.KIND_MODEL) for fp in model_fps.values()]
             + [(fp, D.KIND_DEPLOYMENT) for fp in dep_fps.values()], 1, 1, len(dep_fps))
    return t
