"""Plugin timers: `app.every(seconds, fn, once_per_server=...)`.

Every worker runs each timer on its own loop, at the multiples of `seconds`
since the Unix epoch (as cron does: a 60 s timer runs at every minute), so all
workers agree on the periods. `fn` may be sync or async; an async run that is
still going when the next period comes is not started twice.

once_per_server: at each period the workers race for the period's lease, a
GCRA entry in the shared-memory block admitted at the period's own start time
(`now` = k * seconds, rate one per period, burst 1): the first worker to ask
for period k gets it, every later ask for k is refused, and period k + 1 is
free again whoever held k. There is no owner to fail over from: a worker that
is killed, recycled or reloaded simply stops asking, and the next period goes
to one of the others (or its replacement).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ..shared.table import KeyTable

log = logging.getLogger("neurohttp")


class Timer:
    __slots__ = ("owner", "index", "seconds", "fn", "once", "handle", "task", "runs")

    def __init__(self, owner: str, index: int, seconds: float, fn: Callable[[], Any],
                 once: bool) -> None:
        self.owner = owner
        self.index = index
        self.seconds = seconds
        self.fn = fn
        self.once = once
        self.handle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[Any] | None = None
        self.runs = 0

    @property
    def lease_key(self) -> str:
        return f"t:{self.owner}:{self.index}:{self.seconds!r}"

    @property
    def label(self) -> str:
        return getattr(self.fn, "__qualname__", None) or type(self.fn).__name__


class Timers:
    """The timers plugins registered, run on one worker's loop."""

    def __init__(self) -> None:
        self.timers: list[Timer] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lease: KeyTable | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def add(self, owner: str, seconds: float, fn: Callable[[], Any], once: bool) -> Timer:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0.05 <= seconds <= 86400 * 7:
            raise ValueError(f"every(): seconds must be a number from 0.05 to 604800, "
                             f"not {seconds!r}")
        if not callable(fn):
            raise ValueError(f"every(): {fn!r} is not callable")
        n = sum(1 for t in self.timers if t.owner == owner)
        t = Timer(owner, n, float(seconds), fn, once)
        self.timers.append(t)
        return t

    def start(self, loop: asyncio.AbstractEventLoop, lease: KeyTable) -> None:
        self.loop = loop
        self.lease = lease
        for t in self.timers:
            self._schedule(t)

    def stop(self) -> None:
        for t in self.timers:
            if t.handle is not None:
                t.handle.cancel()
                t.handle = None
        self.loop = None

    def _schedule(self, t: Timer) -> None:
        loop = self.loop
        if loop is None:
            return
        now = time.time()
        k = math.floor(now / t.seconds) + 1
        # a hair after the boundary, so the period index computed then is k
        t.handle = loop.call_later(k * t.seconds - now + 0.002, self._fire, t)

    def _fire(self, t: Timer) -> None:
        t.handle = None
        try:
            k = math.floor(time.time() / t.seconds)
            if t.once:
                assert self.lease is not None
                won = self.lease.admit(t.lease_key, 1, 1.0 / t.seconds, 1,
                                       now=k * t.seconds).allowed
            else:
                won = True
            if won:
                self._run(t)
        except Exception:
            log.exception("plugin %r: timer %s: could not run", t.owner, t.label)
        finally:
            self._schedule(t)

    def _run(self, t: Timer) -> None:
        if t.task is not None and not t.task.done():
            log.warning("plugin %r: timer %s (every %g s) is still running from the last "
                        "period: this one is skipped", t.owner, t.label, t.seconds)
            return
        t.runs += 1
        try:
            r = t.fn()
        except Exception as e:
            log.error("plugin %r: timer %s failed: %s: %s", t.owner, t.label,
                      type(e).__name__, e, exc_info=e)
            return
        if inspect.isawaitable(r):
            assert self.loop is not None
            task = t.task = self.loop.create_task(self._await(t, r))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _await(self, t: Timer, r: Any) -> None:
        try:
            await r
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("plugin %r: timer %s failed: %s: %s", t.owner, t.label,
                      type(e).__name__, e, exc_info=e)

    async def wait_running(self, timeout: float) -> None:
        """At shutdown: let runs in progress finish, up to `timeout` seconds."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, timeout))
