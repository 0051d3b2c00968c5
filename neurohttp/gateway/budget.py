"""A model's retry budget, shared by every worker (docs/ROUTING.md, "Router").

A retry is allowed while the model's retries over the last `WINDOW_US` stay
within `ratio` of its requests over the same span (at least `FLOOR` retries
per window, so a quiet model can still retry once). The span slides: the
previous window counts in proportion to how much of it is still inside the
last `WINDOW_US` (the two-window estimate rate limiters use). So when every
deployment of a model fails, the upstreams see about 1 + ratio attempts per
request instead of 1 + retries (Finagle's and Envoy's retry budgets, and
gRPC's retry throttling, do the same).

Requests are counted lock-free in the model record's C_REQUESTS column as
they are routed; the window's state is read and changed only when a retry
is asked for, under the area's mutex.
"""

from __future__ import annotations

from ..shared import deployments as D

WINDOW_US = 10_000_000
FLOOR = 3


class RetryBudget:
    """A worker's handle on one model's record."""

    __slots__ = ("table", "w", "index", "b", "ratio", "c_req", "c_retry", "c_hedge",
                 "c_fallback", "c_err")

    def __init__(self, table: D.DeploymentTable, index: int, slot: int, ratio: float) -> None:
        self.table = table
        self.w = table.w
        self.index = index
        self.b = table.base(index)
        self.ratio = ratio
        self.c_req = table.column(index, D.C_REQUESTS) + slot
        self.c_retry = table.column(index, D.C_RETRIES) + slot
        self.c_hedge = table.column(index, D.C_HEDGES) + slot
        self.c_fallback = table.column(index, D.C_FALLBACKS) + slot
        self.c_err = table.column(index, D.C_ERRORS) + slot

    def request(self) -> None:
        self.w[self.c_req] += 1

    def spend(self, now: int, hedge: bool = False) -> bool:
        """Ask for one more attempt of a request (a retry, or a hedge): True,
        and counted, if the budget allows it; False, and counted as refused, if not."""
        t = self.table
        w = self.w
        b = self.b
        t.lock()
        try:
            total = t.sum(self.index, D.C_REQUESTS)
            elapsed = now - w[b + D.R_BUD_START]
            if elapsed >= WINDOW_US or w[b + D.R_BUD_START] == 0:
                if elapsed < 2 * WINDOW_US and w[b + D.R_BUD_START]:
                    w[b + D.R_BUD_PREV_REQ] = total - w[b + D.R_BUD_BASE]
                    w[b + D.R_BUD_PREV_RETRIES] = w[b + D.R_BUD_RETRIES]
                else:
                    w[b + D.R_BUD_PREV_REQ] = w[b + D.R_BUD_PREV_RETRIES] = 0
                w[b + D.R_BUD_START] = now
                w[b + D.R_BUD_BASE] = total
                w[b + D.R_BUD_RETRIES] = 0
                elapsed = 0
            prev = 1.0 - elapsed / WINDOW_US  # the previous window's share still inside
            requests = total - w[b + D.R_BUD_BASE] + w[b + D.R_BUD_PREV_REQ] * prev
            retries = w[b + D.R_BUD_RETRIES] + w[b + D.R_BUD_PREV_RETRIES] * prev
            if retries + 1 > max(FLOOR, self.ratio * requests):
                w[b + D.R_BUD_REFUSED] += 1
                return False
            w[b + D.R_BUD_RETRIES] += 1
        finally:
            t.unlock()
        w[self.c_hedge if hedge else self.c_retry] += 1
        return True

    def refund(self, hedge: bool = False) -> None:
        """Give back what `spend` allowed when the attempt could not be made
        after all (no deployment to send it to)."""
        t = self.table
        t.lock()
        try:
            if self.w[self.b + D.R_BUD_RETRIES] > 0:
                self.w[self.b + D.R_BUD_RETRIES] -= 1
        finally:
            t.unlock()
        self.w[self.c_hedge if hedge else self.c_retry] -= 1

    def fallback(self) -> None:
        self.w[self.c_fallback] += 1

    def failed(self) -> None:
        """A request of this model failed for good (its deployments and fallbacks)."""
        self.w[self.c_err] += 1
