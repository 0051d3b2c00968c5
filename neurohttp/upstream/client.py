"""The upstream HTTP client: one pool per origin and settings, in one worker.

Make one per worker, after the fork (pools hold sockets of one process's
loop); providers and plugins share it; `close()` it when the worker drains.
"""

from __future__ import annotations

from typing import Any

from .origin import Origin, split_url
from .pool import Body, Headers, Pool
from .response import Response
from .settings import DEFAULT_LIMITS, DEFAULT_TIMEOUTS, PoolLimits, Timeouts


class UpstreamClient:
    def __init__(self, limits: PoolLimits = DEFAULT_LIMITS,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self.limits = limits        # defaults for pools made without their own
        self.timeouts = timeouts
        self._pools: dict[tuple[Origin, PoolLimits, Timeouts, str | None], Pool] = {}

    def pool(self, url: str, *, limits: PoolLimits | None = None,
             timeouts: Timeouts | None = None, ca_file: str | None = None) -> Pool:
        """The pool for `url`'s origin with these settings (its path is ignored:
        `split_url(base_url)[1]` is a deployment's path prefix). Deployments with
        the same origin and settings share one pool, so their connections are
        reused across them and `max_connections` bounds them together."""
        origin, _ = split_url(url)
        key = (origin, limits or self.limits, timeouts or self.timeouts, ca_file)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(origin, key[1], key[2], ca_file)
        return pool

    async def request(self, method: str, url: str, *, headers: Headers = None,
                      body: Body = None, timeouts: Timeouts | None = None,
                      length: int | None = None) -> Response:
        """One request to an absolute URL, through the default-settings pool of its origin."""
        _, target = split_url(url)
        return await self.pool(url).request(method, target, headers=headers, body=body,
                                            timeouts=timeouts, length=length)

    def stats(self) -> list[dict[str, Any]]:
        return [p.stats() for p in self._pools.values()]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
