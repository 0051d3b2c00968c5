"""The operations on shared state that quotas and plugins use, as an interface
that every backend implements: shared memory today (table.KeyTable), Redis
later (`[state] backend = "redis"`: each operation is one Lua script on one
key, so the arithmetic below is the specification of those scripts too).

Keys are strings chosen by the caller, e.g. "rpm:team-a" or "ip:203.0.113.7".
Times are Unix seconds (float); `now=None` means time.time(). Costs, limits and
counts are integers.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Admission(NamedTuple):
    """What a limiter said about one request.

    allowed: it passes (and was charged; a refused request is not charged).
    retry_after: seconds until the same request would pass (0.0 when allowed;
        inf when it never can: its cost is above the burst or the limit).
    remaining: requests of cost 1 that would pass right now, after this one.
    reset: seconds until the limiter is back to its full allowance.
    """

    allowed: bool
    retry_after: float
    remaining: int
    reset: float


class Store(Protocol):
    def admit(self, key: str, cost: int, rate: float, burst: int,
              now: float | None = None) -> Admission:
        """GCRA (a token bucket refilled continuously at `rate` per second,
        holding at most `burst`): pass and charge `cost` if the bucket holds it,
        else refuse without charging."""
        ...

    def charge(self, key: str, cost: int, rate: float, burst: int,
               now: float | None = None) -> Admission:
        """Charge `cost` whatever the bucket holds, going into debt: tokens a
        stream has sent are owed, and the next admit waits until they are paid.
        `allowed` says whether the charge fitted."""
        ...

    def quota(self, key: str, cost: int, limit: int, window_s: int,
              now: float | None = None, force: bool = False) -> Admission:
        """A counter that resets at every multiple of `window_s` seconds since
        the epoch (86400: at UTC midnight): pass and add `cost` if the window's
        count stays within `limit` (always add with `force`)."""
        ...

    def add(self, key: str, n: int = 1) -> int:
        """Add `n` (may be negative) to an exact counter; return its new value."""
        ...

    def get(self, key: str) -> int:
        """An exact counter's value (0 if it was never added to)."""
        ...
