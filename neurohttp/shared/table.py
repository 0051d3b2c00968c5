"""A fixed-capacity table of keyed entries in shared memory, guarded by one
robust mutex (mutex.py), with the Store operations (store.py) on its entries.

Table words (signed 64-bit):

    [ mutex: 8 ][ T_CAPACITY .. : head ][ entry 0 ][ entry 1 ] ... [ entry capacity-1 ]

An entry is ENTRY_WORDS words: two 64-bit fingerprints of its key (E_H1 is
never 0; 0 marks an empty entry), E_EXP, the time (µs) from which the entry
says nothing a fresh one would not (then it may be dropped without changing any
answer), and values. Open addressing with linear probing from `E_H1 % capacity`;
a lookup stops at the first empty entry, so a dropped entry is removed by
shifting the entries after it back (Knuth's algorithm R), never left as a hole.

Reclaiming: once the table is half full, every new key first sweeps a few
entries from a cursor and drops those past their E_EXP. At 7/8 full a new key
sweeps the whole table (at most once a second); if it is still 7/8 full the key
is refused: the operation answers as if the limit were reached (allowed False,
retry_after 1 s), counts it in T_FULL, and logs once per process. So a full
table never lets a request through that a bigger one would refuse; it refuses
new keys until old ones lapse. Keys already in the table are unaffected.

Writes are ordered so that a process killed between any two of them (the next
locker recovers the mutex) leaves a state that errs on the strict side: E_EXP
is raised before a count is, and a moved entry is written before its old copy
is cleared (at worst a stale duplicate further down its probe run, never read
while the first copy exists).
"""

from __future__ import annotations

import logging
import time
from math import inf

from .keylimits import DAILY, DAY_US, REQUESTS, TOKENS, KeyLimits, KeyVerdict
from .mutex import MUTEX_BYTES, init_mutex, lock_slow, trylock, unlock
from .store import Admission

log = logging.getLogger("neurohttp")

# head words, after the mutex
T_CAPACITY = MUTEX_BYTES // 8
T_COUNT = T_CAPACITY + 1       # entries in use
T_CURSOR = T_CAPACITY + 2      # where the incremental sweep goes on
T_NEXT_FULL_SWEEP = T_CAPACITY + 3  # µs; a whole-table sweep waits until then
T_FULL = T_CAPACITY + 4        # operations refused because the table was full
T_RECOVERED = T_CAPACITY + 5   # mutex recoveries: a process died holding it
T_RECLAIMED = T_CAPACITY + 6   # entries dropped because they had lapsed
T_HIGH = T_CAPACITY + 7        # most entries ever in use
TABLE_HEAD = T_CAPACITY + 8

ENTRY_WORDS = 8
E_H1 = 0
E_H2 = 1
E_EXP = 2          # GCRA: the theoretical arrival time itself; window: its end
E_V0 = 3           # window: the count; counter: the value
NEVER = (1 << 63) - 1

SWEEP_STEP = 8          # entries looked at per new key once the table is half full
FULL_SWEEP_EVERY = 1_000_000  # µs between whole-table sweeps when nearly full


def table_words(capacity: int) -> int:
    """Words of a table of `capacity` entries, rounded up to whole pages (a table
    starts on a page, and pages of it nobody touched cost no memory)."""
    return -(-(TABLE_HEAD + capacity * ENTRY_WORDS) // 512) * 512


def table_capacity(wanted: int) -> int:
    """The power of two at or above `wanted` (at least 16): the probe wraps with a mask."""
    cap = 16
    while cap < wanted:
        cap *= 2
    return cap


_time = time.time
_new = tuple.__new__  # builds an Admission without NamedTuple's Python-level __new__


class KeyTable:
    """One table; `words` is its region of the block as signed 64-bit words and
    `addr` the address of its first byte (the mutex). `name` appears in logs,
    /stats and /metrics."""

    __slots__ = ("w", "addr", "name", "cap", "mask", "limit", "_logged_full")

    def __init__(self, words: memoryview, addr: int, name: str) -> None:
        self.w = words
        self.addr = addr
        self.name = name
        self.cap = words[T_CAPACITY]
        self.mask = self.cap - 1
        self.limit = self.cap - self.cap // 8
        self._logged_full = False

    @staticmethod
    def init(words: memoryview, addr: int, capacity: int) -> None:
        """Master, on a zeroed region, before any worker exists."""
        assert capacity & (capacity - 1) == 0 and len(words) >= table_words(capacity)
        init_mutex(addr)
        words[T_CAPACITY] = capacity

    # ------------------------------------------------------------ locking
    def _lock(self) -> None:
        rc = trylock(self.addr)
        if rc:
            self._lock_slow(rc)

    def _lock_slow(self, rc: int) -> None:
        if lock_slow(self.addr, rc):
            self.w[T_RECOVERED] += 1
            log.warning("shared state %s: a process died holding its lock; recovered",
                        self.name)

    # ------------------------------------------------------------ entries (lock held)
    def _find(self, h1: int, h2: int) -> int:
        """Word offset of the key's entry, or -1 - (index of the empty entry that ends its run)."""
        w = self.w
        mask = self.mask
        i = h1 & mask
        while True:
            e = TABLE_HEAD + i * ENTRY_WORDS
            k = w[e]
            if k == h1 and w[e + 1] == h2:
                return e
            if k == 0:
                return -1 - i
            i = (i + 1) & mask

    def _entry(self, h1: int, h2: int, now: int) -> int:
        """The key's entry, created (all values 0) if absent; -1 if the table is full."""
        e = self._find(h1, h2)
        if e >= 0:
            return e
        w = self.w
        if w[T_COUNT] >= self.cap // 2:
            self._sweep(now, SWEEP_STEP)
            if w[T_COUNT] >= self.limit and now >= w[T_NEXT_FULL_SWEEP]:
                w[T_NEXT_FULL_SWEEP] = now + FULL_SWEEP_EVERY
                self._sweep(now, self.cap)
            if w[T_COUNT] >= self.limit:
                return -1
            e = self._find(h1, h2)  # the sweep may have moved the run
        e = TABLE_HEAD + (-1 - e) * ENTRY_WORDS
        w[e + 1:e + ENTRY_WORDS] = _ZERO[1:]
        w[e + E_H2] = h2
        w[e] = h1  # last: the entry exists from here
        n = w[T_COUNT] = w[T_COUNT] + 1
        if n > w[T_HIGH]:
            w[T_HIGH] = n
        return e

    def _sweep(self, now: int, steps: int) -> None:
        """Drop the lapsed entries among the next `steps` from the cursor."""
        w = self.w
        mask = self.mask
        i = w[T_CURSOR] & mask
        for _ in range(min(steps, self.cap)):
            e = TABLE_HEAD + i * ENTRY_WORDS
            if w[e] and w[e + E_EXP] <= now:
                self._delete(i)
                w[T_RECLAIMED] += 1
                # an entry may have shifted into i: look at i again next turn
            else:
                i = (i + 1) & mask
        w[T_CURSOR] = i

    def _delete(self, i: int) -> None:
        """Empty entry i, shifting back the entries of its run that probed past it."""
        w = self.w
        mask = self.mask
        j = i
        while True:
            j = (j + 1) & mask
            ej = TABLE_HEAD + j * ENTRY_WORDS
            k = w[ej]
            if k == 0:
                break
            home = k & mask
            # entry j stays unless i lies on its probe path: home cyclically in (i, j]
            if (i < home <= j) if i <= j else (home > i or home <= j):
                continue
            ei = TABLE_HEAD + i * ENTRY_WORDS
            w[ei + 1:ei + ENTRY_WORDS] = w[ej + 1:ej + ENTRY_WORDS]
            w[ei] = k          # the copy exists ...
            w[ej] = 0          # ... before the original goes
            i = j
        w[TABLE_HEAD + i * ENTRY_WORDS] = 0
        w[T_COUNT] -= 1

    def _full(self) -> Admission:
        self.w[T_FULL] += 1
        if not self._logged_full:
            self._logged_full = True
            log.error("shared state %s: all %d entries are in use; new keys are refused "
                      "(as over their limit) until old ones lapse. Raise %s and restart",
                      self.name, self.cap,
                      "[state] max_keys" if self.name == "open" else "the config's key count")
        return _new(Admission, (False, 1.0, 0, 1.0))

    # ------------------------------------------------------------ Store operations
    # Each operation is written out in full, and finds its key at its home
    # entry inline: on the request path every call and attribute costs (the
    # budget of a key check and a quota is 2 µs; loadtests/shm_primitives_bench.py).
    def charge(self, key: str, cost: int, rate: float, burst: int,
               now: float | None = None) -> Admission:
        return self.admit(key, cost, rate, burst, now, debt=True)

    def admit(self, key: str, cost: int, rate: float, burst: int,
              now: float | None = None, *, debt: bool = False) -> Admission:
        t = int((_time() if now is None else now) * 1_000_000)
        step = round(1_000_000 / rate) or 1  # the emission interval, µs
        h1 = hash(key) or 1
        h2 = hash(key + "\0")
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            e = TABLE_HEAD + (h1 & self.mask) * ENTRY_WORDS
            if w[e] != h1 or w[e + 1] != h2:
                e = self._entry(h1, h2, t)
                if e < 0:
                    return self._full()
            tat = w[e + E_EXP]
            if tat < t:
                tat = t
            new = tat + cost * step
            allow_at = new - burst * step
            if allow_at > t and not debt:
                # refused, not charged
                return _new(Admission, (False, inf if cost > burst else (allow_at - t) / 1e6,
                                        max(0, (t + burst * step - tat) // step),
                                        (tat - t) / 1e6))
            w[e + E_EXP] = new  # one word: the state and its lapse time at once
        finally:
            unlock(a)
        if allow_at <= t:
            return _new(Admission, (True, 0.0, (t + burst * step - new) // step, (new - t) / 1e6))
        return _new(Admission, (False, (allow_at - t) / 1e6, 0, (new - t) / 1e6))

    def quota(self, key: str, cost: int, limit: int, window_s: int,
              now: float | None = None, force: bool = False) -> Admission:
        t = int((_time() if now is None else now) * 1_000_000)
        span = window_s * 1_000_000
        h1 = hash(key) or 1
        h2 = hash(key + "\0")
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            e = TABLE_HEAD + (h1 & self.mask) * ENTRY_WORDS
            if w[e] != h1 or w[e + 1] != h2:
                e = self._entry(h1, h2, t)
                if e < 0:
                    return self._full()
            end = w[e + E_EXP]
            if end <= t:  # a new window: its end first (strict if we die here), then the count
                end = w[e + E_EXP] = t - t % span + span
                w[e + E_V0] = 0
            count = w[e + E_V0]
            if count + cost > limit and not force:
                return _new(Admission, (False, inf if cost > limit else (end - t) / 1e6,
                                        max(0, limit - count), (end - t) / 1e6))
            count = w[e + E_V0] = count + cost
        finally:
            unlock(a)
        if count <= limit:
            return _new(Admission, (True, 0.0, limit - count, (end - t) / 1e6))
        return _new(Admission, (False, (end - t) / 1e6, 0, (end - t) / 1e6))

    def add(self, key: str, n: int = 1) -> int:
        h1 = hash(key) or 1
        h2 = hash(key + "\0")
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            e = TABLE_HEAD + (h1 & self.mask) * ENTRY_WORDS
            if w[e] != h1 or w[e + 1] != h2:
                e = self._entry(h1, h2, int(_time() * 1_000_000))
                if e < 0:
                    self._full()
                    raise TableFull(f"shared state {self.name} is full: "
                                    f"counter {key!r} not added to")
            value = w[e + E_V0] + n
            if value:
                w[e + E_EXP] = NEVER  # kept while not 0 (set before the value)
                w[e + E_V0] = value
            else:
                # 0 is what an absent counter reads: dropped now, not left for a
                # sweep (a table of live counters under its limit never refuses a key)
                self._delete((e - TABLE_HEAD) // ENTRY_WORDS)
        finally:
            unlock(a)
        return value

    def set(self, key: str, value: int) -> int:
        """Set an exact counter (a plugin's gauge); returns the value before."""
        h1 = hash(key) or 1
        h2 = hash(key + "\0")
        self._lock()
        try:
            w = self.w
            e = self._entry(h1, h2, int(_time() * 1_000_000))
            if e < 0:
                self._full()
                raise TableFull(f"shared state {self.name} is full: counter {key!r} not set")
            old = w[e + E_V0]
            if value:
                w[e + E_EXP] = NEVER
                w[e + E_V0] = value
            else:
                self._delete((e - TABLE_HEAD) // ENTRY_WORDS)  # (as add's)
        finally:
            unlock(self.addr)
        return old

    def get(self, key: str) -> int:
        h1 = hash(key) or 1
        h2 = hash(key + "\0")
        self._lock()
        try:
            e = self._find(h1, h2)
            return self.w[e + E_V0] if e >= 0 else 0
        finally:
            unlock(self.addr)

    # ------------------------------------------------------------ API keys
    # A key has two entries: its quota state "q:NAME" (E_V0 the request bucket's
    # TAT, E_V1 the token bucket's TAT, E_V2 the day's window end, E_V3 the day's
    # count) and its figures "f:NAME" (KF_* below, kept for good). Both are found
    # by fingerprints the KeyLimits computed once, and taken under one lock.
    def _key_entries(self, k: KeyLimits, t: int) -> tuple[int, int]:
        """(quota entry, figures entry) of key `k`, created if absent; -1 if full (lock held)."""
        w = self.w
        # the figures first: E_EXP "never" at once, so creating the quota entry
        # (which may sweep lapsed entries) cannot drop it, only shift it
        f = TABLE_HEAD + (k.fh1 & self.mask) * ENTRY_WORDS
        if w[f] != k.fh1 or w[f + 1] != k.fh2:
            f = self._entry(k.fh1, k.fh2, t)
            if f >= 0:
                w[f + E_EXP] = NEVER
        q = TABLE_HEAD + (k.qh1 & self.mask) * ENTRY_WORDS
        if w[q] != k.qh1 or w[q + 1] != k.qh2:
            q = self._entry(k.qh1, k.qh2, t)
            if q >= 0 and f >= 0:
                f = self._find(k.fh1, k.fh2)  # a sweep may have shifted it
        return q, f

    def key_admit(self, k: KeyLimits, now: float | None = None,
                  charge: bool = True) -> KeyVerdict:
        """Admit one request of key `k`: its rpm, tpm and daily limits checked
        (and its request charged) at once, and the key's figures counted
        (requests, or 429s), under one lock. `charge=False` only looks.

        rpm and tpm are GCRA buckets (admit's arithmetic: a request needs one
        request of room, and one token of room in the token bucket, which is
        not charged here: tokens are charged as used, key_charge), the day a
        window ending at UTC midnight (quota's). Written out in full, as the
        other operations are: it runs on every keyed request. The Redis
        backend's KEY_ADMIT script is its transcription (redis_store.py)."""
        t = int((_time() if now is None else now) * 1_000_000)
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            mask = self.mask
            f = TABLE_HEAD + (k.fh1 & mask) * ENTRY_WORDS
            q = TABLE_HEAD + (k.qh1 & mask) * ENTRY_WORDS
            if w[f] != k.fh1 or w[f + 1] != k.fh2 or w[q] != k.qh1 or w[q + 1] != k.qh2:
                q, f = self._key_entries(k, t)
                if q < 0 or f < 0:
                    self._full()
                    return _new(KeyVerdict, (False, REQUESTS, 1.0, 0, 1.0, 0, 1.0, 0, 1.0))
            if not k.limited:
                if charge:
                    w[f + KF_REQUESTS] += 1
                return _FREE
            rs = k.rpm_step
            ts = k.tpm_step
            dl = k.daily
            refused = ""
            wait = 0
            rtat = new_r = ttat = 0
            if rs:
                rtat = w[q + E_V0]
                if rtat < t:
                    rtat = t
                new_r = rtat + rs
                at = new_r - k.rpm * rs
                if at > t:
                    refused = REQUESTS
                    wait = at - t
            if ts:
                ttat = w[q + E_V0 + 1]
                if ttat < t:
                    ttat = t
                at = ttat + ts - k.tpm * ts  # room for one token
                if at > t:
                    if not refused:
                        refused = TOKENS
                    if at - t > wait:
                        wait = at - t
            dend = dcount = 0
            if dl:
                dend = w[q + E_V0 + 2]
                if dend > t:
                    dcount = w[q + E_V0 + 3]
                else:  # the day's window is over: a new one (written by key_charge)
                    dend = _midnight_after(t)
                if dcount >= dl:
                    if not refused:
                        refused = DAILY
                    if dend - t > wait:
                        wait = dend - t
            if refused or not charge:
                new_r = rtat
                if charge:
                    w[f + KF_429] += 1
            else:
                if rs:
                    if new_r > w[q + E_EXP]:
                        w[q + E_EXP] = new_r  # raised before the value it covers
                    w[q + E_V0] = new_r
                w[f + KF_REQUESTS] += 1
        finally:
            unlock(a)
        # the figures the headers need (only those of the limits the key has)
        rrem = (t + k.rpm * rs - new_r) // rs if rs else 0
        trem = (t + k.tpm * ts - ttat) // ts if ts else 0
        drem = dl - dcount
        return _new(KeyVerdict, (
            not refused, refused, wait / 1e6, rrem, (new_r - t) / 1e6 if rs else 0.0,
            trem if trem > 0 else 0, (ttat - t) / 1e6 if ts else 0.0,
            drem if drem > 0 else 0, (dend - t) / 1e6 if dl else 0.0))

    def key_charge(self, k: KeyLimits, tokens_in: int, tokens_out: int,
                   now: float | None = None) -> None:
        """Charge tokens used by key `k` to its tpm bucket (into debt if need be:
        the next admission waits) and its day, and count them in its figures."""
        t = int((_time() if now is None else now) * 1_000_000)
        n = tokens_in + tokens_out
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            mask = self.mask
            f = TABLE_HEAD + (k.fh1 & mask) * ENTRY_WORDS
            q = TABLE_HEAD + (k.qh1 & mask) * ENTRY_WORDS
            if w[f] != k.fh1 or w[f + 1] != k.fh2 or w[q] != k.qh1 or w[q + 1] != k.qh2:
                q, f = self._key_entries(k, t)  # not at their home slots (or absent)
            if q >= 0:
                if k.tpm_step:
                    tat = w[q + E_V0 + 1]
                    if tat < t:
                        tat = t
                    tat += n * k.tpm_step
                    if tat > w[q + E_EXP]:
                        w[q + E_EXP] = tat
                    w[q + E_V0 + 1] = tat
                if k.daily:
                    end = w[q + E_V0 + 2]
                    if end <= t:  # a new day: its end first (strict if we die here), then the count
                        end = _midnight_after(t)
                        if end > w[q + E_EXP]:
                            w[q + E_EXP] = end
                        w[q + E_V0 + 2] = end
                        w[q + E_V0 + 3] = 0
                    w[q + E_V0 + 3] += n
            else:
                self._full()
            if f >= 0:
                w[f + KF_TOKENS_IN] += tokens_in
                w[f + KF_TOKENS_OUT] += tokens_out
        finally:
            unlock(a)

    def key_count(self, k: KeyLimits, word: int, n: int = 1) -> None:
        """Add `n` to one of key `k`'s figures (KF_*), e.g. a 403 or a request
        admitted by another backend."""
        t = int(_time() * 1_000_000)
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            f = self._key_entries(k, t)[1]
            if f >= 0:
                self.w[f + word] += n
            else:
                self._full()
        finally:
            unlock(a)

    def key_figures(self, k: KeyLimits) -> dict[str, int]:
        """Key `k`'s figures since the server started (each word alone is exact)."""
        self._lock()
        try:
            f = self._find(k.fh1, k.fh2)
            vals = [self.w[f + i] for i in KF_WORDS] if f >= 0 else [0] * len(KF_WORDS)
        finally:
            unlock(self.addr)
        return dict(zip(KF_NAMES, vals, strict=True))

    # ------------------------------------------------------------ connections per client
    # The firewall's max_connections_per_ip (security/firewall.py), exact across
    # the workers: an entry per client address "c:IP" holds its open connections
    # (E_V0) and is marked CONN_TOTAL (E_V4); an entry per (address, worker slot)
    # holds that worker's share (E_V0), its slot (E_V1), the total's fingerprints
    # (E_V2, E_V3) and CONN_SHARE (E_V4). Live entries never lapse (E_EXP "never");
    # an entry back at 0 is droppable (E_EXP 0), as a counter's is. When a worker
    # dies however it dies (SIGKILL, os._exit), the master calls fold_conns with
    # its slot before the slot is used again: the totals are recomputed from the
    # other workers' shares, so nothing it held, or was half-way through writing,
    # stays counted.
    def conn_open(self, ip: str, slot: int, limit: int) -> int:
        """A worker in `slot` accepted a connection from `ip`: count it if the
        address holds fewer than `limit`. 1: counted; 0: at the limit (not
        counted); -1: the table is full (not counted)."""
        tk = "c:" + ip
        th1 = hash(tk) or 1
        th2 = hash(tk + "\0")
        sk = f"{tk}#{slot}"
        sh1 = hash(sk) or 1
        sh2 = hash(sk + "\0")
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            t = int(_time() * 1_000_000)
            e = self._entry(th1, th2, t)
            if e < 0:
                self._full()
                return -1
            if w[e + E_V0] >= limit:
                return 0
            w[e + E_EXP] = NEVER  # kept from here (it may be new)
            w[e + CONN_MARK] = CONN_TOTAL
            s = self._entry(sh1, sh2, t)
            if s < 0:
                self._full()
                e = self._find(th1, th2)
                if e >= 0 and w[e + E_V0] == 0:
                    w[e + E_EXP] = 0  # a new total left at 0: droppable again
                return -1
            w[s + E_EXP] = NEVER
            w[s + E_V0 + 1] = slot
            w[s + E_V0 + 2] = th1
            w[s + E_V0 + 3] = th2
            w[s + CONN_MARK] = CONN_SHARE
            w[s + E_V0] += 1
            e = self._find(th1, th2)  # creating the share may have shifted it
            w[e + E_V0] += 1
        finally:
            unlock(a)
        return 1

    def conn_close(self, ip: str, slot: int) -> None:
        """A connection conn_open counted for `ip` in `slot` ended."""
        tk = "c:" + ip
        sk = f"{tk}#{slot}"
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            for h1, h2 in ((hash(sk) or 1, hash(sk + "\0")), (hash(tk) or 1, hash(tk + "\0"))):
                e = self._find(h1, h2)
                if e >= 0:
                    n = w[e + E_V0] - 1
                    if n > 0:
                        w[e + E_V0] = n
                    else:
                        w[e + E_V0] = 0
                        w[e + E_EXP] = 0  # droppable
        finally:
            unlock(a)

    def conn_count(self, ip: str) -> int:
        """Connections open from `ip` across the workers."""
        return self.get("c:" + ip)

    def fold_conns(self, slot: int) -> int:
        """Master, after the worker in `slot` exited (before the slot is reused):
        drop its shares and recompute every total from the others' shares.
        Returns how many connections it still held. One pass over the table:
        its words are copied out (a memcpy) and the marks found with bytes.find,
        so the lock is held for well under a millisecond at 16384 entries
        unless many addresses hold connections."""
        a = self.addr
        rc = trylock(a)
        if rc:
            self._lock_slow(rc)
        try:
            w = self.w
            raw = w[TABLE_HEAD:TABLE_HEAD + self.cap * ENTRY_WORDS].tobytes()
            sums: dict[tuple[int, int], int] = {}
            totals: list[int] = []
            held = 0
            for mark in (_SHARE_BYTES, _TOTAL_BYTES):
                p = raw.find(mark)
                while p >= 0:
                    if p % _ENTRY_BYTES == _MARK_OFFSET:
                        e = TABLE_HEAD + p // 8 - CONN_MARK
                        if w[e] and w[e + CONN_MARK] == CONN_SHARE:
                            n = w[e + E_V0]
                            if w[e + E_V0 + 1] == slot:
                                held += n
                                w[e + E_V0] = 0
                                w[e + E_EXP] = 0
                            elif n:
                                k = (w[e + E_V0 + 2], w[e + E_V0 + 3])
                                sums[k] = sums.get(k, 0) + n
                        elif w[e] and w[e + CONN_MARK] == CONN_TOTAL:
                            totals.append(e)
                    p = raw.find(mark, p + 1)
            for e in totals:
                n = sums.get((w[e], w[e + E_H2]), 0)
                if w[e + E_V0] != n:
                    w[e + E_V0] = n
                if n == 0:
                    w[e + E_EXP] = 0
        finally:
            unlock(a)
        return held

    # ------------------------------------------------------------ figures
    def figures(self) -> dict[str, int]:
        """For /stats and /metrics: read without the lock (each word alone is exact)."""
        w = self.w
        return {"capacity": self.cap, "used": w[T_COUNT], "high": w[T_HIGH],
                "full": w[T_FULL], "reclaimed": w[T_RECLAIMED], "recovered": w[T_RECOVERED]}


class TableFull(Exception):
    """An exact counter could not be created: the table has no room for its key."""


_ZERO = memoryview(bytes(ENTRY_WORDS * 8)).cast("q")

# the marks of the per-client connection entries (in E_V4, a word no other
# entry of the open table uses): "NHCONNT" / "NHCONNS" as little-endian words
CONN_MARK = E_V0 + 4
CONN_TOTAL = int.from_bytes(b"NHCONNT\0", "little")
CONN_SHARE = int.from_bytes(b"NHCONNS\0", "little")
_TOTAL_BYTES = CONN_TOTAL.to_bytes(8, "little", signed=True)
_SHARE_BYTES = CONN_SHARE.to_bytes(8, "little", signed=True)
_ENTRY_BYTES = ENTRY_WORDS * 8
_MARK_OFFSET = CONN_MARK * 8

# an API key's figures entry: its words and their names in /stats
KF_REQUESTS = E_V0      # requests admitted
KF_TOKENS_IN = E_V0 + 1
KF_TOKENS_OUT = E_V0 + 2
KF_403 = E_V0 + 3       # refused: a model outside its list
KF_429 = E_V0 + 4       # refused: over a limit
KF_WORDS = (KF_REQUESTS, KF_TOKENS_IN, KF_TOKENS_OUT, KF_403, KF_429)
KF_NAMES = ("requests", "tokens_in", "tokens_out", "forbidden", "rate_limited")
_day = [0, 0]  # [the UTC day's start, its end] (µs) last computed


def _midnight_after(t: int) -> int:
    """The first UTC midnight after `t` (µs); a long division once a day, not per call."""
    if not _day[0] <= t < _day[1]:
        start = t - t % DAY_US
        _day[0], _day[1] = start, start + DAY_US
    return _day[1]


# the admission of a key without limits (only its figures are counted)
_FREE = KeyVerdict(True, "", 0.0, 0, 0.0, 0, 0.0, 0, 0.0)
assert KF_429 < ENTRY_WORDS
