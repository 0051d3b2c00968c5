"""The router's state in shared memory: one record per deployment and per
model, that every worker reads and writes (docs/ROUTING.md, "Router").

Area words (signed 64-bit), after the key tables of the block:

    [ mutex: 8 ][ RH_* head ][ record 0 ][ record 1 ] ... [ record capacity-1 ]

A record is `R_COLS` shared words (breaker, Retry-After, latency, retry
budget), changed under the area's robust mutex (mutex.py) where a decision
depends on them, then `NCOLS` columns of `nslots` words each: column word 0
holds what workers that exited left (their counts are folded in by the
master), word s the live count of the worker in stats slot s. A worker
writes only its own words of a column, so counting a request, and the
outstanding requests `least_outstanding` sums, take no lock.

Who owns a record: the master, before it forks a generation, `assign`s one
to each deployment and model of the config by a fingerprint of its table
(`fingerprint`). A deployment or model whose table did not change keeps its
record across a reload (its breaker, latency and counts); a changed one gets
a fresh record; one that left the config keeps its record until every worker
of the generations that used it has exited, and is then reused. Workers
find their records by fingerprint (`find`). A deployment's record also names
its figure pair (R_FIG): which two of the stats block's per-model blocks hold
its figures (gateway/figures.py), given with the record and freed with it, so
the figures follow the deployment, not its place in the list. When a worker exits however it
exits, the master `fold`s its slot's words before the slot is used again:
its counts go to word 0, its outstanding requests are dropped.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

import orjson

from .mutex import MUTEX_BYTES, init_mutex, lock_slow, trylock, unlock

# ---- head words, after the mutex
RH_CAPACITY = MUTEX_BYTES // 8   # records
RH_NSLOTS = RH_CAPACITY + 1      # words per column (stats slots, the retired slot 0 included)
RH_USED = RH_CAPACITY + 2        # records owned by a live config
RH_RECOVERED = RH_CAPACITY + 3   # mutex recoveries: a process died holding it
RH_FULL = RH_CAPACITY + 4        # assignments refused for want of a free record
RH_HEAD = RH_CAPACITY + 8

# ---- record words: identity
R_FP = 0           # fingerprint (0: a free record)
R_KIND = 1         # KIND_DEPLOYMENT or KIND_MODEL
R_RETIRED = 2      # 0: in the running config; g: left it at the switch to generation g
# deployment: breaker (gateway/breaker.py)
R_BR_STATE = 3     # CLOSED, OPEN or HALF_OPEN
R_BR_FAILS = 4     # consecutive failures
R_BR_UNTIL = 5     # µs (monotonic): OPEN until then; HALF_OPEN: the probe's lease ends then
R_BR_OPENED = 6    # times it opened
R_BR_PROBES = 7    # half-open probes sent
R_BR_CLOSED = 8    # times a probe closed it again
# deployment: Retry-After and latency
R_RA_UNTIL = 9     # µs (monotonic): skipped until then (the upstream's Retry-After)
R_RA_STATUS = 10   # the status that said so (429, 503)
R_TTFB_US = 11     # EWMA of the time to first byte, µs (0: none yet)
R_TTFB_AT = 12     # µs (monotonic) of its last sample
R_FIG = 13         # its figure pair + 1 (0: none), given by `assign`
# model: the retry budget (gateway/budget.py)
R_BUD_START = 3    # µs (monotonic) the window began
R_BUD_BASE = 4     # the model's requests (column sum) when it began
R_BUD_RETRIES = 5  # retries in the window
R_BUD_PREV_REQ = 6
R_BUD_PREV_RETRIES = 7
R_BUD_REFUSED = 8  # retries the budget refused
R_COLS = 16

# ---- columns (each `nslots` words: [retired, slot 1, slot 2, ...])
C_OUTSTANDING = 0  # deployment: requests in flight (not folded: dropped when a worker exits)
C_REQUESTS = 1     # deployment: attempts sent; model: requests routed
C_ERRORS = 2       # deployment: attempts that failed; model: requests that failed for good
C_RETRIES = 3      # deployment: attempts that were retries; model: retries
C_HEDGES = 4       # deployment: hedged attempts sent; model: hedges
C_FALLBACKS = 5    # model: requests that went on to a fallback model
NCOLS = 6

KIND_DEPLOYMENT = 1
KIND_MODEL = 2

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = ("closed", "open", "half_open")

PAGE_WORDS = 512


def record_words(nslots: int) -> int:
    return R_COLS + NCOLS * nslots


def area_words(capacity: int, nslots: int) -> int:
    """Words of an area of `capacity` records, rounded up to whole pages."""
    return -(-(RH_HEAD + capacity * record_words(nslots)) // PAGE_WORDS) * PAGE_WORDS


def fingerprint(kind: int, model: str, table: dict[str, Any], nth: int = 0) -> int:
    """A stable, non-zero 63-bit fingerprint of a deployment's (or a model's)
    whole table: any change to it makes a new deployment with fresh state.
    `nth` tells identical deployments of one model apart."""
    doc = orjson.dumps([kind, model, table, nth], option=orjson.OPT_SORT_KEYS,
                       default=str)
    fp = int.from_bytes(hashlib.blake2b(doc, digest_size=8).digest(), "little") >> 1
    return fp or 1


def config_fingerprints(models: dict[str, dict[str, Any]]
                        ) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """The fingerprints of a config's `[models.*]`: (model -> fp, (model, deployment index) -> fp).
    A model written as one table is its own single deployment."""
    model_fps: dict[str, int] = {}
    dep_fps: dict[tuple[str, int], int] = {}
    for name, table in models.items():
        deps = table.get("deployments")
        own = {k: v for k, v in table.items() if k != "deployments"}
        model_fps[name] = fingerprint(KIND_MODEL, name, own)
        seen: dict[int, int] = {}
        for i, dep in enumerate(deps if deps else [own]):
            base = fingerprint(KIND_DEPLOYMENT, name, dep)
            nth = seen[base] = seen.get(base, -1) + 1
            dep_fps[(name, i)] = fingerprint(KIND_DEPLOYMENT, name, dep, nth) if nth else base
    return model_fps, dep_fps


def records_needed(models: dict[str, dict[str, Any]]) -> int:
    model_fps, dep_fps = config_fingerprints(models)
    return len(model_fps) + len(dep_fps)


class RouterStateFull(Exception):
    """No free record for a deployment or model of a new config."""


def now_us() -> int:
    """CLOCK_MONOTONIC in µs: one clock for every process of the machine."""
    return time.monotonic_ns() // 1000


class DeploymentTable:
    """The router area of the block; `words` its region as signed 64-bit words,
    `addr` the address of its first byte (the mutex)."""

    __slots__ = ("w", "addr", "cap", "nslots", "rec_words")

    def __init__(self, words: memoryview, addr: int) -> None:
        self.w = words
        self.addr = addr
        self.cap = words[RH_CAPACITY]
        self.nslots = words[RH_NSLOTS]
        self.rec_words = record_words(self.nslots)

    @staticmethod
    def init(words: memoryview, addr: int, capacity: int, nslots: int) -> None:
        """Master, on a zeroed region, before any worker exists."""
        assert len(words) >= area_words(capacity, nslots)
        init_mutex(addr)
        words[RH_CAPACITY] = capacity
        words[RH_NSLOTS] = nslots

    # ------------------------------------------------------------ locking
    def lock(self) -> None:
        rc = trylock(self.addr)
        if rc and lock_slow(self.addr, rc):
            self.w[RH_RECOVERED] += 1

    def unlock(self) -> None:
        unlock(self.addr)

    # ------------------------------------------------------------ records
    def base(self, index: int) -> int:
        """Word offset of record `index`."""
        return RH_HEAD + index * self.rec_words

    def column(self, index: int, col: int) -> int:
        """Word offset of column `col` of record `index` (its retired word; slot s is + s)."""
        return RH_HEAD + index * self.rec_words + R_COLS + col * self.nslots

    def find(self, fp: int) -> int:
        """The record of fingerprint `fp`, or -1."""
        w = self.w
        for i in range(self.cap):
            if w[self.base(i) + R_FP] == fp:
                return i
        return -1

    def assign(self, wanted: Iterable[tuple[int, int]], generation: int,
               oldest_live: int, fig_pairs: int = 0) -> list[int]:
        """Master, before forking `generation`: give each (fingerprint, kind) of
        its config a record. Records of fingerprints no longer wanted are marked
        retired at `generation`; such a record is reused only once no worker
        older than that generation lives (`oldest_live`: the oldest generation
        among live workers, `generation` when there is none). Raises
        RouterStateFull (changing nothing) if the config does not fit.

        Each deployment record without a figure pair (a new one) gets the
        lowest pair below `fig_pairs` that no record in use holds (none when
        all are taken: its figures are not counted); records no live worker
        uses give theirs back. Returns the pairs given, whose old figures the
        caller clears."""
        want = dict(wanted)
        given: list[int] = []
        self.lock()
        try:
            w = self.w
            have: dict[int, int] = {}
            free: list[int] = []
            for i in range(self.cap):
                b = self.base(i)
                fp = w[b + R_FP]
                if fp and fp in want:
                    have[fp] = i
                elif fp == 0 or (w[b + R_RETIRED] and w[b + R_RETIRED] <= oldest_live):
                    free.append(i)
            new = [fp for fp in want if fp not in have]
            if len(new) > len(free):
                w[RH_FULL] += 1
                raise RouterStateFull(
                    f"the router's shared state has {self.cap} records and this config "
                    f"needs {len(new)} more than are free (one per deployment and per "
                    f"model; records of a replaced config stay in use until its workers "
                    f"exit): raise [stats] max_deployments and restart")
            for i in range(self.cap):
                b = self.base(i)
                fp = w[b + R_FP]
                if fp and fp not in want and not w[b + R_RETIRED]:
                    w[b + R_RETIRED] = generation
            for i in free:  # records no live worker uses: their figure pairs are free
                w[self.base(i) + R_FIG] = 0
            for fp, i in zip(new, free, strict=False):
                b = self.base(i)
                w[b + R_FP] = 0  # free while it is cleared
                w[b + 1:b + self.rec_words] = _zeros(self.rec_words - 1)
                w[b + R_KIND] = want[fp]
                w[b + R_FP] = fp
                have[fp] = i
            for i in have.values():
                w[self.base(i) + R_RETIRED] = 0
            held = {w[self.base(i) + R_FIG] - 1 for i in range(self.cap)
                    if w[self.base(i) + R_FP] and w[self.base(i) + R_FIG]}
            pairs = (p for p in range(fig_pairs) if p not in held)
            for fp, i in have.items():
                b = self.base(i)
                if want[fp] == KIND_DEPLOYMENT and not w[b + R_FIG]:
                    pair = next(pairs, -1)
                    if pair >= 0:
                        w[b + R_FIG] = pair + 1
                        given.append(pair)
            w[RH_USED] = len(want)
        finally:
            self.unlock()
        return given

    def figure_pair(self, index: int) -> int:
        """The figure pair of deployment record `index` (-1: none, or no record)."""
        return self.w[self.base(index) + R_FIG] - 1 if index >= 0 else -1

    def fold(self, slot: int) -> int:
        """Master, after the worker in stats slot `slot` exited (before the slot
        is reused): add its counts to the retired words, drop its outstanding
        requests. Returns how many requests it still had outstanding."""
        held = 0
        self.lock()
        try:
            w = self.w
            for i in range(self.cap):
                if not w[self.base(i) + R_FP]:
                    continue
                for col in range(NCOLS):
                    c = self.column(i, col)
                    n = w[c + slot]
                    if n:
                        if col == C_OUTSTANDING:
                            held += n
                        else:
                            w[c] += n
                        w[c + slot] = 0
        finally:
            self.unlock()
        return held

    def sum(self, index: int, col: int) -> int:
        """A column's total over every slot (no lock: each word alone is exact)."""
        c = self.column(index, col)
        return sum(self.w[c:c + self.nslots])

    def figures(self, index: int) -> tuple[list[int], list[int]]:
        """Record `index`'s words and column totals, read under the lock so a
        fold is never seen half done: (the R_COLS head words, the NCOLS column totals)."""
        self.lock()
        try:
            w = self.w
            b = self.base(index)
            head = list(w[b:b + R_COLS])
            cols = [self.sum(index, col) for col in range(NCOLS)]
        finally:
            self.unlock()
        return head, cols

    def area_figures(self) -> dict[str, int]:
        w = self.w
        return {"capacity": self.cap, "used": w[RH_USED], "full": w[RH_FULL],
                "recovered": w[RH_RECOVERED]}


def _zeros(n: int) -> memoryview:
    return memoryview(bytes(n * 8)).cast("q")
