"""Per-key quotas over the configured backend: the shared-memory table (every
worker of this server, exact) or Redis (every server sharing it, exact).

Both answer an admission with a KeyVerdict. The shared-memory one answers at
once (one lock); the Redis one returns an awaitable (one round trip, bounded by
`[state] timeout_ms`). When Redis fails or is slow, `on_redis_error` decides:
"fail_open" admits (counted, logged at most once a second), "fail_closed"
refuses with 503. After a failure, Redis is not asked again for a second
(requests answered by the policy at once, none waits for a dead server), then
one request tries it again.

The key's figures (requests, tokens, refusals) are always this server's, in the
shared-memory table: /metrics is per server, and Prometheus adds servers up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..shared.keylimits import KeyLimits, KeyVerdict
from ..shared.table import KF_403, KF_429, KF_REQUESTS, KeyTable

log = logging.getLogger("neurohttp")

REDIS_ERRORS = "auth:redis_errors"    # exact counters in the named table
REDIS_FAIL_OPEN = "auth:redis_fail_open"
REDIS_FAIL_CLOSED = "auth:redis_fail_closed"
BREAK_S = 1.0  # after a Redis failure, the policy answers alone this long


class RedisDown(Exception):
    """Redis failed and `on_redis_error = "fail_closed"`: the request gets 503."""


class ShmQuotas:
    """Quotas in this server's shared-memory block."""

    def __init__(self, table: KeyTable) -> None:
        self.table = table
        # the table's own methods: no call of ours around them on the request path
        self.admit: Callable[[KeyLimits], KeyVerdict] = table.key_admit
        self.charge: Callable[[KeyLimits, int, int], None] = table.key_charge

    def peek(self, k: KeyLimits) -> KeyVerdict | None:
        return self.table.key_admit(k, charge=False)

    def forbidden(self, k: KeyLimits) -> None:
        self.table.key_count(k, KF_403)

    def figures(self, k: KeyLimits) -> dict[str, int]:
        return self.table.key_figures(k)


class RedisQuotas:
    """Quotas in Redis; the figures in this server's shared-memory table."""

    def __init__(self, store: Any, table: KeyTable, timeout_s: float, fail_open: bool) -> None:
        self.store = store  # shared.redis_store.RedisStore
        self.table = table
        self.timeout = timeout_s
        self.fail_open = fail_open
        self._figs: dict[str, KeyLimits] = {}
        self._last: dict[str, KeyVerdict] = {}
        self._down_until = 0.0
        self._logged = 0.0
        self._pending: list[tuple[KeyLimits, int]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # charges in flight (held: not collected)

    def _fig(self, k: KeyLimits) -> KeyLimits:
        """The key's figures entry, with no limits: what the shared-memory
        table counts when the limits live in Redis."""
        f = self._figs.get(k.name)
        if f is None:
            f = self._figs[k.name] = KeyLimits(k.name)
        return f

    def admit(self, k: KeyLimits) -> KeyVerdict | Awaitable[KeyVerdict | None] | None:
        if not k.limited:  # nothing to ask Redis: this server's figures only
            return self.table.key_admit(self._fig(k))
        if time.monotonic() < self._down_until:
            self._policy(k)
            return None
        return self._admit(k)

    async def _admit(self, k: KeyLimits) -> KeyVerdict | None:
        try:
            async with asyncio.timeout(self.timeout):
                v = await self.store.key_admit(k)
        except Exception as e:  # any failure of the backend: the policy decides
            self._failed(e)
            self._policy(k)
            return None
        self._last[k.name] = v
        self.table.key_count(self._fig(k), KF_REQUESTS if v.allowed else KF_429)
        return v

    def _failed(self, e: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + BREAK_S
        self.table.add(REDIS_ERRORS)
        if now - self._logged >= 1.0:
            self._logged = now
            log.error("redis ([state] url) failed: %s; %s until it answers again",
                      type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}",
                      "admitting requests unchecked (on_redis_error = fail_open)"
                      if self.fail_open else
                      "refusing keyed requests with 503 (on_redis_error = fail_closed)")

    def _policy(self, k: KeyLimits) -> None:
        """Redis did not answer: admit (fail_open) or raise RedisDown (fail_closed)."""
        if self.fail_open:
            self.table.add(REDIS_FAIL_OPEN)
            self.table.key_count(self._fig(k), KF_REQUESTS)
            return
        self.table.add(REDIS_FAIL_CLOSED)
        raise RedisDown()

    def peek(self, k: KeyLimits) -> KeyVerdict | None:
        """The key's figures as this worker last saw them (no round trip)."""
        return self._last.get(k.name)

    def charge(self, k: KeyLimits, tokens_in: int, tokens_out: int) -> None:
        """Counted in the figures now; sent to Redis with the other charges of
        this turn of the loop in one pipeline."""
        self.table.key_charge(self._fig(k), tokens_in, tokens_out)
        if not (k.tpm or k.daily) or not tokens_in + tokens_out:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((k, tokens_in + tokens_out))

    def _flush(self) -> None:
        charges, self._pending = self._pending, []
        if charges and time.monotonic() >= self._down_until:
            task = asyncio.get_running_loop().create_task(self._send(charges))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, charges: list[tuple[KeyLimits, int]]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.store.key_charge_many(charges)
        except Exception as e:
            self._failed(e)

    def forbidden(self, k: KeyLimits) -> None:
        self.table.key_count(self._fig(k), KF_403)

    def figures(self, k: KeyLimits) -> dict[str, int]:
        return self.table.key_figures(self._fig(k))
