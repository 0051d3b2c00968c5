"""Shared state for plugins: exact counters, rate limiters (GCRA token
buckets) and figures, over the server's [state] backend.

With `backend = "shm"` (the default) every operation is one lock in the
shared-memory block (neurohttp/shared/table.py) and answers at once: exact
across the workers of this server. With `backend = "redis"` the operations
are the same Lua scripts the API keys' quotas use (shared/redis_store.py),
exact across every server sharing the Redis, and each returns an awaitable
(`await` it in an async hook; `settle()` takes either). A Redis that fails or
is slower than [state] timeout_ms is handled by [state] on_redis_error:
fail_open answers as if allowed (a counter reads 0), fail_closed raises
StateUnavailable (the hook's request gets 500, or what the plugin makes of it).

Names: a plugin's counters and figures live in the `named` table under
"p:<plugin>:<name>" (room from [plugins] max_state_keys), its limiters' keys
(client addresses, header values: open-ended) in the `open` table under
"p:<plugin>:<name>:<key>" (room from [state] max_keys; when it is full new
keys are refused as over their limit, logged once).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from ..shared.store import Admission
from ..shared.table import KeyTable

log = logging.getLogger("neurohttp")

T = TypeVar("T")
NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
BREAK_S = 1.0  # after a Redis failure, the policy answers alone this long


class StateUnavailable(Exception):
    """The shared state (Redis) failed and [state] on_redis_error is fail_closed."""


async def settle(value: T | Awaitable[T]) -> T:
    """Await `value` if it is awaitable: shared-memory answers come at once,
    Redis answers as awaitables; `await settle(x)` takes both."""
    if inspect.isawaitable(value):
        return await value
    return value


def check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must be 1-63 of a-z, 0-9 and '_', "
                         f"not starting with a digit")
    return name


class StateRuntime:
    """What a worker's shared state is: its tables (None in `neurohttpd check`,
    where nothing runs), the Redis store when [state] backend is redis, and
    the budget of named keys plugins may declare."""

    def __init__(self, named: KeyTable | None = None, open_table: KeyTable | None = None,
                 redis: Any = None, timeout_s: float = 0.05, fail_open: bool = True,
                 max_names: int = 1024) -> None:
        self.named = named
        self.open = open_table
        self.redis = redis  # shared.redis_store.RedisStore, or None
        self.timeout = timeout_s
        self.fail_open = fail_open
        self.max_names = max_names
        self.names: set[str] = set()  # named keys declared by every plugin of this worker
        self._down_until = 0.0
        self._logged = 0.0

    @property
    def backend(self) -> str:
        return "redis" if self.redis is not None else "shm"

    def declare(self, plugin: str, key: str) -> None:
        """A named key a plugin uses (a counter, a figure): counted against
        [plugins] max_state_keys, so a plugin that declares too many fails at
        load, naming itself, not at some request later."""
        if key in self.names:
            return
        if len(self.names) >= self.max_names:
            raise ValueError(f"plugin {plugin!r}: more than {self.max_names} shared counters "
                             f"and figures in all (raise [plugins] max_state_keys)")
        self.names.add(key)

    def table(self, which: str) -> KeyTable:
        t = self.named if which == "named" else self.open
        if t is None:
            raise RuntimeError("shared state is only available in a running worker "
                               "(not in neurohttpd check): use it from hooks, routes and "
                               "timers, not from setup()")
        return t

    # ------------------------------------------------------------ Redis, bounded
    async def redis_call(self, coro: Awaitable[T], fallback: T) -> T:
        if time.monotonic() < self._down_until:
            return self._policy(fallback, None, coro)
        try:
            async with asyncio.timeout(self.timeout):
                return await coro
        except Exception as e:
            self._down_until = time.monotonic() + BREAK_S
            return self._policy(fallback, e, None)

    def _policy(self, fallback: T, e: BaseException | None, coro: Any) -> T:
        if coro is not None and inspect.iscoroutine(coro):
            coro.close()  # never awaited: Redis is not asked while it is down
        now = time.monotonic()
        if e is not None and now - self._logged >= 1.0:
            self._logged = now
            log.error("redis ([state] url) failed for a plugin: %s; %s", type(e).__name__,
                      "answering as allowed (on_redis_error = fail_open)" if self.fail_open
                      else "failing the request (on_redis_error = fail_closed)")
        if self.fail_open:
            return fallback
        raise StateUnavailable("the shared state (redis) is not answering")


class Counter:
    """An exact shared integer: `add(n)` returns the new value (one atomic
    step: no other worker's add falls between), `get()` and `set(v)`."""

    __slots__ = ("name", "key", "_rt")

    def __init__(self, rt: StateRuntime, plugin: str, name: str) -> None:
        self.name = check_name("counter", name)
        self.key = f"p:{plugin}:{name}"
        self._rt = rt
        rt.declare(plugin, self.key)

    def add(self, n: int = 1) -> int | Awaitable[int]:
        rt = self._rt
        if rt.redis is not None:
            return rt.redis_call(rt.redis.add(self.key, n), 0)
        return rt.table("named").add(self.key, n)

    def get(self) -> int | Awaitable[int]:
        rt = self._rt
        if rt.redis is not None:
            return rt.redis_call(rt.redis.get(self.key), 0)
        return rt.table("named").get(self.key)

    def set(self, value: int) -> int | Awaitable[int]:
        """Set the value; returns the one before."""
        rt = self._rt
        if rt.redis is not None:
            return rt.redis_call(rt.redis.set(self.key, int(value)), 0)
        return rt.table("named").set(self.key, int(value))


_ALLOWED = Admission(True, 0.0, 0, 0.0)


class Rate:
    """A token bucket per key (GCRA: refilled continuously at `per_s` tokens a
    second, holding at most `burst`), exact across workers (and servers, with
    Redis). `admit(key, cost=1)` passes and charges `cost` if the key's bucket
    holds it, else refuses without charging; the Admission says how long to
    wait (retry_after), what is left (remaining) and when it is full again
    (reset), for Retry-After and x-ratelimit-* headers."""

    __slots__ = ("name", "per_s", "burst", "prefix", "_rt", "_table")

    def __init__(self, rt: StateRuntime, plugin: str, name: str, per_s: float,
                 burst: int) -> None:
        self.name = check_name("rate", name)
        if not (isinstance(per_s, (int, float)) and not isinstance(per_s, bool) and per_s > 0):
            raise ValueError(f"rate {name!r}: per_s must be a number above 0, not {per_s!r}")
        if not (type(burst) is int and burst >= 1):
            raise ValueError(f"rate {name!r}: burst must be an int of at least 1, not {burst!r}")
        self.per_s = float(per_s)
        self.burst = burst
        self.prefix = f"p:{plugin}:{name}:"
        self._rt = rt
        # shared memory in a worker: the table itself, so admit is one call away
        self._table: KeyTable | None = rt.open if rt.redis is None else None

    def admit(self, key: str = "", cost: int = 1) -> Admission | Awaitable[Admission]:
        t = self._table
        if t is not None:
            return t.admit(self.prefix + key, cost, self.per_s, self.burst)
        rt = self._rt
        if rt.redis is not None:
            return rt.redis_call(rt.redis.admit(self.prefix + key, cost, self.per_s, self.burst),
                                 _ALLOWED)
        return rt.table("open").admit(self.prefix + key, cost, self.per_s, self.burst)

    def peek(self, key: str = "") -> Admission | Awaitable[Admission]:
        """What admit(key, cost=0) says: the bucket's state, nothing charged."""
        return self.admit(key, 0)


class Metric:
    """A figure of a plugin in /stats (under "plugins", then the plugin's name)
    and /metrics (neurohttp_plugin_<plugin>_<name>, `_total` for a counter).
    Exact across the workers of this server (the shared-memory block, whatever
    the backend: /metrics is per server; Prometheus adds servers up).
    A counter only goes up (`add`); a gauge is `set` or moved by `add`."""

    __slots__ = ("plugin", "name", "kind", "help", "key", "_rt")

    def __init__(self, rt: StateRuntime, plugin: str, name: str, kind: str,
                 help: str = "") -> None:
        self.name = check_name("metric", name)
        if kind not in ("counter", "gauge"):
            raise ValueError(f"metric {name!r}: kind must be 'counter' or 'gauge', not {kind!r}")
        self.plugin = plugin
        self.kind = kind
        self.help = help or f"{name} ({kind} of plugin {plugin})"
        self.key = f"m:{plugin}:{name}"
        self._rt = rt
        rt.declare(plugin, self.key)

    def add(self, n: int = 1) -> int:
        if self.kind == "counter" and n < 0:
            raise ValueError(f"metric {self.name!r} is a counter: it only goes up")
        return self._rt.table("named").add(self.key, n)

    def set(self, value: int) -> None:
        if self.kind != "gauge":
            raise ValueError(f"metric {self.name!r} is a counter: add() to it, set() is for gauges")
        self._rt.table("named").set(self.key, int(value))

    def value(self) -> int:
        return self._rt.table("named").get(self.key)
