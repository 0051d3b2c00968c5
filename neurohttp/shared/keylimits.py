"""An API key's limits as the shared-state backends take them, and what an
admission says: the batched operations of one key (rpm, tpm and daily tokens
checked and charged together, under one lock in shared memory or in one Lua
script in Redis), so a request costs one lock or one round trip, not three.

The arithmetic is the Store's (store.py): rpm and tpm are GCRA buckets (refilled
continuously, never a counter that resets on the minute), daily tokens a window
that ends at UTC midnight. `tests/test_key_quotas.py` checks the batched
operations against the Store's single ones step by step.
"""

from __future__ import annotations

from typing import NamedTuple

DAY_US = 86_400_000_000
MINUTE_US = 60_000_000

# which limit refused a request (KeyVerdict.refused)
REQUESTS = "requests"
TOKENS = "tokens"
DAILY = "daily_tokens"


class KeyLimits:
    """One key's limits, in the units the backends compute in (µs). 0: no limit.

    rpm: a bucket of `rpm` requests refilled at rpm per minute (one every
    `rpm_step` µs). tpm: the same for tokens; a request is admitted while the
    bucket holds at least one token, and its tokens are charged as they are
    used (prompt, then completion as it streams), into debt if need be.
    daily: tokens per UTC day.
    """

    __slots__ = ("name", "rpm", "tpm", "daily", "rpm_step", "tpm_step", "limited",
                 "qh1", "qh2", "fh1", "fh2")

    def __init__(self, name: str, rpm: int = 0, tpm: int = 0, daily: int = 0) -> None:
        self.name = name
        self.rpm = rpm
        self.tpm = tpm
        self.daily = daily
        self.rpm_step = -(-MINUTE_US // rpm) if rpm else 0  # rounded up: never more than rpm
        self.tpm_step = -(-MINUTE_US // tpm) if tpm else 0
        self.limited = bool(rpm or tpm or daily)
        # fingerprints of the key's two entries in the shared-memory table (the
        # quota state and the figures), computed once instead of per request
        qk, fk = "q:" + name, "f:" + name
        self.qh1, self.qh2 = hash(qk) or 1, hash(qk + "\0")
        self.fh1, self.fh2 = hash(fk) or 1, hash(fk + "\0")

    def __repr__(self) -> str:
        return (f"KeyLimits({self.name!r}, rpm={self.rpm}, tpm={self.tpm}, "
                f"daily={self.daily})")


class KeyVerdict(NamedTuple):
    """What one admission said, with the figures the x-ratelimit-* headers carry.

    allowed: the request passes (and its request was charged).
    refused: "" or the first limit that refused it: REQUESTS, TOKENS or DAILY.
    retry_after: seconds until every limit that refused it would pass (0.0 when allowed).
    *_remaining / *_reset: what is left in each bucket after this request and
    seconds until it is full again (the day: until UTC midnight).
    """

    allowed: bool
    refused: str
    retry_after: float
    requests_remaining: int
    requests_reset: float
    tokens_remaining: int
    tokens_reset: float
    daily_remaining: int
    daily_reset: float


def verdict(limits: KeyLimits, t: int, rtat: int, ttat: int, dend: int, dcount: int,
            charge: bool) -> tuple[KeyVerdict, int]:
    """The admission of one request at `t` (µs) from the key's state: the GCRA
    theoretical arrival times of its request and token buckets (`rtat`, `ttat`),
    and its day's window end and count. Returns the verdict and the request
    bucket's new TAT (to be written if allowed and `charge`).

    Pure arithmetic: the shared-memory table runs it under its lock, and the
    Redis script is its transcription into Lua (redis_store.py)."""
    rs, ts, dl = limits.rpm_step, limits.tpm_step, limits.daily
    if rtat < t:
        rtat = t
    if ttat < t:
        ttat = t
    if dend <= t:  # the day's window is over: a new one
        dend = t - t % DAY_US + DAY_US
        dcount = 0
    refused = ""
    wait = 0
    new_r = rtat
    if rs:
        new_r = rtat + rs
        at = new_r - limits.rpm * rs
        if at > t:
            refused, wait = REQUESTS, at - t
    if ts:
        at = ttat + ts - limits.tpm * ts  # room for one token
        if at > t:
            refused = refused or TOKENS
            wait = max(wait, at - t)
    if dl and dcount >= dl:
        refused = refused or DAILY
        wait = max(wait, dend - t)
    if refused or not charge:
        new_r = rtat
    return _new(KeyVerdict, (
        not refused, refused, wait / 1e6,
        (t + limits.rpm * rs - new_r) // rs if rs else 0, (new_r - t) / 1e6,
        max(0, (t + limits.tpm * ts - ttat) // ts) if ts else 0, (ttat - t) / 1e6,
        max(0, dl - dcount), (dend - t) / 1e6)), new_r


_new = tuple.__new__  # builds a KeyVerdict without NamedTuple's Python-level __new__
