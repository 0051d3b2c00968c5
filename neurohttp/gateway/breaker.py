"""One deployment's shared state as a worker uses it: its circuit breaker,
its upstream's Retry-After, its time to first byte, and its counts
(the record is shared/deployments.py's; every worker sees the same words).

The breaker (docs/ROUTING.md, "Router"):

    CLOSED --(breaker_failures consecutive failures)--> OPEN
    OPEN --(breaker_cooldown_s passed; one request claims the probe)--> HALF_OPEN
    HALF_OPEN --(the probe succeeds)--> CLOSED
    HALF_OPEN --(the probe fails)--> OPEN (for another cool-down)

Only one request in the whole server is the probe: claiming it is a
compare-and-set under the area's mutex. If the probe's outcome never comes
(its worker was killed), another request may claim it once its lease ends.
A success is the first byte of an answer; a failure is an attempt that
failed before it (connect error, timeout, 5xx) or a stream cut by the
upstream. A 429 is not a failure: the upstream is alive and said when to
come back (`retry_after`). `breaker_failures = 0` turns the breaker off.

Every method takes the time as µs of CLOCK_MONOTONIC (`now_us()`), which all
processes share, so tests drive it with a fake clock.
"""

from __future__ import annotations

from ..shared import deployments as D

# the EWMA of the time to first byte: new = old + (sample - old) / 4
EWMA_SHIFT = 2

# what `state` says of a deployment
READY = 0       # closed: use it
PROBE = 1       # open past its cool-down (or its probe's lease ended): a request may claim the probe
BLOCKED = 2     # open, its probe taken, or inside the upstream's Retry-After


class DeploymentState:
    """A worker's handle on one deployment's record; `slot` is the worker's
    stats slot (its words of each column)."""

    __slots__ = ("table", "w", "index", "b", "slot", "failures", "cooldown_us", "lease_us",
                 "c_out", "c_req", "c_err", "c_retry", "c_hedge", "o_state", "o_fails", "o_ra",
                 "name")

    def __init__(self, table: D.DeploymentTable, index: int, slot: int,
                 breaker_failures: int, breaker_cooldown_s: float, probe_lease_s: float) -> None:
        self.table = table
        self.w = table.w
        self.index = index
        self.b = table.base(index)
        self.slot = slot
        self.name: str | None = None  # what the access log calls it (ModelRoute sets it)
        self.failures = breaker_failures
        self.cooldown_us = int(breaker_cooldown_s * 1e6)
        self.lease_us = int(max(probe_lease_s, breaker_cooldown_s) * 1e6)
        # this worker's word of each column
        self.c_out = table.column(index, D.C_OUTSTANDING) + slot
        self.c_req = table.column(index, D.C_REQUESTS) + slot
        self.c_err = table.column(index, D.C_ERRORS) + slot
        self.c_retry = table.column(index, D.C_RETRIES) + slot
        self.c_hedge = table.column(index, D.C_HEDGES) + slot
        # the words every request reads, as offsets (no module lookups on the request path)
        self.o_state = self.b + D.R_BR_STATE
        self.o_fails = self.b + D.R_BR_FAILS
        self.o_ra = self.b + D.R_RA_UNTIL

    # ------------------------------------------------------------ reading (no lock)
    def state(self, now: int) -> int:
        w = self.w
        if w[self.o_ra] > now:
            return BLOCKED
        if w[self.o_state] == 0:  # CLOSED
            return READY
        return PROBE if now >= w[self.b + D.R_BR_UNTIL] else BLOCKED

    def outstanding(self) -> int:
        """Requests in flight to it, from every worker."""
        c = self.c_out - self.slot
        return sum(self.w[c:c + self.table.nslots])

    def ttfb_us(self) -> int:
        return self.w[self.b + D.R_TTFB_US]

    def ttfb_at(self) -> int:
        return self.w[self.b + D.R_TTFB_AT]

    def available_at(self) -> int:
        """µs (monotonic) from which it may be tried again (now or earlier: it may)."""
        w = self.w
        b = self.b
        at = w[b + D.R_RA_UNTIL]
        if w[b + D.R_BR_STATE] != D.CLOSED and w[b + D.R_BR_UNTIL] > at:
            at = w[b + D.R_BR_UNTIL]
        return at

    def retry_after_status(self) -> int:
        return self.w[self.b + D.R_RA_STATUS]

    def limited_status(self, now: int) -> int:
        """The status (429, 503) of the Retry-After it is inside of now, else 0."""
        w = self.w
        return w[self.b + D.R_RA_STATUS] if w[self.b + D.R_RA_UNTIL] > now else 0

    # ------------------------------------------------------------ the breaker
    def claim_probe(self, now: int) -> bool:
        """Take the half-open probe if nobody holds it: True if this request is it."""
        t = self.table
        w = self.w
        b = self.b
        t.lock()
        try:
            st = w[b + D.R_BR_STATE]
            if st == D.CLOSED or now < w[b + D.R_BR_UNTIL]:
                return False
            w[b + D.R_BR_UNTIL] = now + self.lease_us
            w[b + D.R_BR_STATE] = D.HALF_OPEN
            w[b + D.R_BR_PROBES] += 1
            return True
        finally:
            t.unlock()

    def measured(self, ttfb_us: int, now: int) -> None:
        """A first byte came `ttfb_us` after the attempt began (the EWMA that
        lowest_latency reads; only models with that strategy measure it)."""
        w = self.w
        b = self.b
        old = w[b + D.R_TTFB_US]
        # a lost update between two workers costs one sample: no lock for it
        w[b + D.R_TTFB_US] = ttfb_us if old == 0 else old + ((ttfb_us - old) >> EWMA_SHIFT)
        w[b + D.R_TTFB_AT] = now

    def success(self) -> None:
        """The first byte of an answer came: the breaker's failures start again
        (a half-open probe's success closes it)."""
        w = self.w
        if w[self.o_fails] or w[self.o_state] == D.HALF_OPEN:
            b = self.b
            t = self.table
            t.lock()
            try:
                w[b + D.R_BR_FAILS] = 0
                if w[b + D.R_BR_STATE] == D.HALF_OPEN:
                    w[b + D.R_BR_STATE] = D.CLOSED
                    w[b + D.R_BR_UNTIL] = 0
                    w[b + D.R_BR_CLOSED] += 1
            finally:
                t.unlock()

    def failure(self, now: int) -> None:
        """An attempt on it failed (before its first byte, or cut mid-stream)."""
        w = self.w
        b = self.b
        w[self.c_err] += 1
        t = self.table
        t.lock()
        try:
            st = w[b + D.R_BR_STATE]
            if st == D.OPEN:
                return  # already open: failures of attempts begun before count for nothing
            fails = w[b + D.R_BR_FAILS] = w[b + D.R_BR_FAILS] + 1
            if st == D.HALF_OPEN or (self.failures and fails >= self.failures):
                w[b + D.R_BR_UNTIL] = now + self.cooldown_us
                w[b + D.R_BR_STATE] = D.OPEN
                w[b + D.R_BR_OPENED] += 1
        finally:
            t.unlock()

    def retry_after(self, seconds: float, status: int, now: int) -> None:
        """The upstream said (429/503 with Retry-After) not to come back for `seconds`."""
        w = self.w
        b = self.b
        until = now + int(seconds * 1e6)
        t = self.table
        t.lock()
        try:
            if until > w[b + D.R_RA_UNTIL]:
                w[b + D.R_RA_STATUS] = status
                w[b + D.R_RA_UNTIL] = until
        finally:
            t.unlock()

    # ------------------------------------------------------------ counting (own words)
    def begin(self, retry: bool, hedge: bool) -> None:
        w = self.w
        w[self.c_out] += 1
        w[self.c_req] += 1
        if retry:
            w[self.c_retry] += 1
        if hedge:
            w[self.c_hedge] += 1

    def end(self) -> None:
        self.w[self.c_out] -= 1
