"""Balancing strategies: which of a model's usable deployments gets the next
attempt (docs/ROUTING.md, "Router"). Sans-IO: a strategy sees the
deployments' shared state (gateway/breaker.py) and the time, nothing else.

    round_robin        each in turn (per worker, as nginx's round robin is)
    weighted           smooth weighted round robin (nginx's): over any
                       sum(weights) consecutive picks each deployment gets
                       its weight's share, spread out, not in bursts
    least_outstanding  the fewest requests in flight, summed over every
                       worker through shared memory; ties go round robin
    lowest_latency     the lowest recent time to first byte (an EWMA shared
                       by the workers); a deployment with no sample, or none
                       for STALE_US, goes first, so a deployment that was
                       slow once is measured again instead of starved
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .breaker import DeploymentState

STRATEGIES = ("round_robin", "weighted", "least_outstanding", "lowest_latency")
STALE_US = 30_000_000


class Strategy(Protocol):
    def pick(self, deps: Sequence[DeploymentState], candidates: Sequence[int], now: int) -> int:
        """One of `candidates` (indexes into `deps`, never empty)."""
        ...


class RoundRobin:
    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = 0

    def start(self, n: int) -> int:
        """The index the turn is at (then moved on by one)."""
        i = self.next % n
        self.next = i + 1
        return i

    def pick(self, deps: Sequence[DeploymentState], candidates: Sequence[int], now: int) -> int:
        # the first candidate at or after the turn, over the whole list, so that
        # skipping a blocked deployment does not shift the others' turns
        n = len(deps)
        i = self.start(n)
        best = candidates[0]
        dist = n
        for c in candidates:
            d = (c - i) % n
            if d < dist:
                best, dist = c, d
        return best


class Weighted:
    __slots__ = ("weights", "current")

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = list(weights)
        self.current = [0] * len(weights)

    def pick(self, deps: Sequence[DeploymentState], candidates: Sequence[int], now: int) -> int:
        cur = self.current
        total = 0
        best = candidates[0]
        for c in candidates:
            cur[c] += self.weights[c]
            total += self.weights[c]
            if cur[c] > cur[best]:
                best = c
        cur[best] -= total
        return best


class _Lowest:
    """The candidate with the lowest score, scanned from a rotating start so
    that ties are shared out; a score of None picks that candidate at once."""

    __slots__ = ("rr",)

    def __init__(self) -> None:
        self.rr = RoundRobin()

    def score(self, d: DeploymentState, now: int) -> int | None:
        raise NotImplementedError

    def pick(self, deps: Sequence[DeploymentState], candidates: Sequence[int], now: int) -> int:
        n = len(candidates)
        start = self.rr.start(n)
        best = -1
        low = 0
        for k in range(n):
            c = candidates[(start + k) % n]
            t = self.score(deps[c], now)
            if t is None:
                return c
            if best < 0 or t < low:
                best, low = c, t
        return best


class LeastOutstanding(_Lowest):
    """Fewest requests in flight, summed across every worker (shared memory)."""

    __slots__ = ()

    def score(self, d: DeploymentState, now: int) -> int | None:
        return d.outstanding()


class LowestLatency(_Lowest):
    """Lowest recent time to first byte; an unmeasured or stale one first (to measure it)."""

    __slots__ = ()

    def score(self, d: DeploymentState, now: int) -> int | None:
        t = d.ttfb_us()
        return None if t == 0 or now - d.ttfb_at() > STALE_US else t


def make_strategy(name: str, weights: Sequence[int]) -> Strategy:
    if name == "round_robin":
        return RoundRobin()
    if name == "weighted":
        return Weighted(weights)
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "lowest_latency":
        return LowestLatency()
    raise ValueError(f"unknown strategy {name!r} (one of {', '.join(STRATEGIES)})")
