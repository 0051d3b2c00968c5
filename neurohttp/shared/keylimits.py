"""An API key's limits as the shared-state backends take them, and what an
admission says: the batched operations of one key (rpm, tpm and daily tokens
checked and charged together, under one lock in shared memory or in one Lua
script in Redis), so a request costs one lock or one round trip, not three.

The arithmetic is the Store's (store.py): rpm and tpm are GCRA buckets (refilled
continuously, never a counter that resets on the minute), daily tokens a window
that ends at UTC midnight (table.py KeyTable.key_admit; redis_store.py KEY_ADMIT
is its transcription into Lua). `tests/test_key_quotas.py` checks the batched
operations against the Store's single ones, and Redis against shared memory,
step by step.
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
                 "qh1", "qh2", "fh1", "fh2", "rpm_text", "tpm_text")

    def __init__(self, name: str, rpm: int = 0, tpm: int = 0, daily: int = 0) -> None:
        self.name = name
        self.rpm = rpm
        self.tpm = tpm
        self.daily = daily
        self.rpm_step = -(-MINUTE_US // rpm) if rpm else 0  # rounded up: never more than rpm
        self.tpm_step = -(-MINUTE_US // tpm) if tpm else 0
        self.limited = bool(rpm or tpm or daily)
        self.rpm_text, self.tpm_text = str(rpm), str(tpm)  # header values, made once
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
