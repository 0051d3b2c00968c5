"""Layout of the shared-memory block: 64-bit words, no pointers.

    [ header: HEADER_WORDS ][ slot 0: retired totals ][ slot 1 ] ... [ slot N ][ shared state ]

Every slot has the same layout. A worker writes only its own slot (so the
request path takes no lock); the master folds a dead worker's slot into slot 0
under a seqlock (`H_SEQ`) so readers never see a counter counted twice or lost.
The shared state (exact counters, rate limiters: neurohttp/shared/) follows the
slots.

The sizes (slots, routes and models per cell, shared-state tables) are computed
from the config when the master creates the block (`Geometry`, stats/sizing.py)
and recorded in the header; every reader takes them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..shared.deployments import area_words
from ..shared.table import table_words

MAGIC = 0x4E455552_4F485454  # "NEUROHTT"
LAYOUT_VERSION = 4     # 3: sizes from the config in the header, the shared-state area; 4: the router's area
PAGE_WORDS = 512       # slots and the state area start on a page: a freed slot's pages are dropped

# ---- header words
H_MAGIC = 0
H_VERSION = 1
H_MASTER_PID = 2
H_STARTED = 3          # Unix seconds the master started
H_NSLOTS = 4           # slots including the retired slot 0
H_SLOT_WORDS = 5
H_WORKERS = 6          # live workers, kept by the master
H_SEQ = 7              # seqlock: odd while the master folds a slot
H_RELOADS = 8
H_RESTARTS = 9         # workers replaced after dying or hanging
H_GENERATION = 10      # config generation; bumped on every reload
H_ROUTES = 11          # route blocks per cell (index 0 is "other")
H_MODELS = 12          # model blocks per cell (index 0 is "other")
H_MAX_WORKERS = 13     # workers the block was sized for (TTIN's ceiling); slots = 2x (reloads)
H_STATE_OFF = 14       # word offset of the shared-state area (neurohttp/shared/)
H_STATE_WORDS = 15
H_NAMED_KEYS = 16      # capacity of the named-key table (keys known from the config)
H_OPEN_KEYS = 17       # capacity of the open-key table ([state] max_keys: IPs, header values)
H_DEPLOYMENTS = 18     # records of the router's area (shared/deployments.py), after the tables
HEADER_WORDS = 64

# ---- slot words: identity (never folded)
S_PID = 0
S_STATE = 1            # STATE_* below
S_WORKER_ID = 2        # the N of "neurohttpd: worker N"
S_STARTED = 3          # Unix seconds
S_HEARTBEAT = 4        # CLOCK_MONOTONIC milliseconds of the worker loop's last tick
S_GENERATION = 5

STATE_FREE, STATE_STARTING, STATE_READY, STATE_DRAINING = 0, 1, 2, 3

# ---- counters (summed over slots, folded into the retired slot)
S_REQUESTS = 8
S_RESPONSES = 9  # not written: readers sum the status classes
S_STATUS = 10          # S_STATUS + 1..5 for 1xx..5xx (index 10 unused)
S_BYTES_IN = 16
S_BYTES_OUT = 17
S_TOKENS_IN = 18
S_TOKENS_OUT = 19
S_STREAMS = 20         # streams started
S_STREAMS_CANCELLED = 21
S_CONNECTIONS = 22     # connections accepted
S_LATENCY_SUM_US = 23
S_ERRORS_PARSE = 24    # requests refused as malformed (400/431/413/408 from the protocol)
# the response cache (ai/cache.py): answers given from it, looked up and not
# found, dropped for room (LRU), dropped because their ttl had passed
S_CACHE_HITS = 25
S_CACHE_MISSES = 26
S_CACHE_EVICTIONS = 27
S_CACHE_EXPIRED = 28
COUNTERS = [S_REQUESTS, S_RESPONSES, *range(S_STATUS + 1, S_STATUS + 6), S_BYTES_IN,
            S_BYTES_OUT, S_TOKENS_IN, S_TOKENS_OUT, S_STREAMS, S_STREAMS_CANCELLED,
            S_CONNECTIONS, S_LATENCY_SUM_US, S_ERRORS_PARSE,
            S_CACHE_HITS, S_CACHE_MISSES, S_CACHE_EVICTIONS, S_CACHE_EXPIRED]

# ---- gauges (summed over live slots, reset when a worker is folded)
S_ACTIVE_CONNECTIONS = 32
S_STREAMS_ACTIVE = 33
S_CACHE_BYTES = 34     # the response cache's size and entries (a worker's cache dies with it)
S_CACHE_ENTRIES = 35
GAUGES = [S_ACTIVE_CONNECTIONS, S_STREAMS_ACTIVE, S_CACHE_BYTES, S_CACHE_ENTRIES]

# ---- maxima (folded by max)
S_LATENCY_MAX_US = 40
MAXIMA = [S_LATENCY_MAX_US]

# ---- latency histogram: quarter-octave buckets in microseconds, 16 us .. ~67 s.
# Bucket i counts latencies <= BUCKET_BOUNDS_US[i]; the last bucket is +Inf.
BUCKET_BOUNDS_US: list[int] = [round(2 ** (i / 4)) for i in range(16, 105)]
S_HIST = 64
N_BUCKETS = len(BUCKET_BOUNDS_US) + 1
HIST_END = S_HIST + N_BUCKETS

# ---- windowed figures: what the last minute looked like (stats/window.py)
#
# Each slot holds a ring of RING_CELLS per-second cells, keyed by the Unix second
# in their first word, and CUM, a cell-shaped running sum of every closed cell.
# The worker's tick closes the current cell once a second (adds it to CUM, then
# zeroes and stamps the next one) under the slot's own seqlock S_WIN_SEQ. So:
#   since start = CUM + the current cell;   last 60 s = the cells stamped now-60..now-1.
# A cell holds, per route and per model, a coarse latency histogram (half-octave:
# two fine buckets per coarse bucket, so the request path finds the coarse bucket
# with a shift) and a few counters. Route and model 0 are "other" (unmatched
# paths, protocol errors, routes and models past the block's room).
CBUCKET_BOUNDS_US: list[int] = BUCKET_BOUNDS_US[1::2]  # coarse bucket c = fine bucket >> 1
N_CBUCKETS = len(CBUCKET_BOUNDS_US) + 1                 # 45, the last is +Inf
assert N_CBUCKETS == (N_BUCKETS + 1) // 2

# route block: [coarse histogram][responses by status class 1xx..5xx]. The
# histogram counts every response, so the request path skips the 2xx word: the
# reader derives 2xx as the histogram's total minus the other classes.
RB_CLASS = N_CBUCKETS - 1       # class c (1..5) is at RB_CLASS + c
ROUTE_WORDS = N_CBUCKETS + 5
# model block: [coarse histogram: one per finished request][errors][tokens in][tokens out][spare]
MB_ERRORS = N_CBUCKETS
MB_TOKENS_IN = N_CBUCKETS + 1
MB_TOKENS_OUT = N_CBUCKETS + 2
MODEL_WORDS = N_CBUCKETS + 5

# cell words
C_STAMP = 0            # Unix second the cell counts (0: never used)
C_CONNECTIONS = 1      # active connections, sampled when the cell closes
C_STREAMS = 2          # active streams, sampled when the cell closes
C_ROUTES = 4           # then `routes` route blocks, then `models` model blocks (Geometry)

WINDOW_SECONDS = 60
RING_CELLS = 64        # 60 closed seconds + the current one + slack for slow readers

# slot words
S_WIN_SEQ = 160        # odd while the worker's tick closes a cell
S_WIN_CUR = 161        # stamp of the current cell
S_WIN_FOLDED = 162     # stamp of the last cell added into CUM
# How many route and model indexes this slot's writer uses: the prefix of each
# cell it zeroes and sums, and all a reader or the fold reads of it. Pages past
# it are never touched, so the room the block has for more costs no memory.
S_WIN_ROUTES = 163
S_WIN_MODELS = 164
S_CUM = 1024           # after the text area (S_TEXT, below); the ring follows CUM

# ---- text (never summed): in a worker's slot, why it failed or what it was
# stuck on, for the master to log; in slot 0, the master's own facts as JSON
# (config path) for `neurohttpd status`. The ring and CUM follow it.
S_TEXT = 896
TEXT_BYTES = 128 * 8

assert HIST_END <= S_WIN_SEQ and S_WIN_FOLDED < S_TEXT
assert S_TEXT * 8 + TEXT_BYTES <= S_CUM * 8


def _pages(words: int) -> int:
    """`words` rounded up to whole pages."""
    return -(-words // PAGE_WORDS) * PAGE_WORDS


# The block starts with the header; slot 0 then starts on the next page.
SLOTS_OFF = PAGE_WORDS


@dataclass(frozen=True)
class Geometry:
    """The sizes of one block: chosen from the config at start, kept in its header."""

    routes: int = 64        # route indexes per cell, "other" included
    models: int = 16        # model indexes per cell, "other" included
    max_workers: int = 8    # live workers at once; the block has twice as many slots
    named_keys: int = 1024  # shared-state table of keys known from the config
    open_keys: int = 16384  # shared-state table of open-ended keys (client IPs, ...)
    deployments: int = 64   # router records: one per deployment and per model

    @cached_property
    def nslots(self) -> int:
        """Slots including the retired slot 0: a reload runs two generations at once."""
        return 2 * self.max_workers + 1

    @cached_property
    def c_models(self) -> int:
        return C_ROUTES + self.routes * ROUTE_WORDS

    @cached_property
    def cell_words(self) -> int:
        return self.c_models + self.models * MODEL_WORDS

    @cached_property
    def s_ring(self) -> int:
        return S_CUM + self.cell_words

    @cached_property
    def slot_words(self) -> int:
        return _pages(self.s_ring + RING_CELLS * self.cell_words)

    @cached_property
    def state_off(self) -> int:
        return SLOTS_OFF + self.nslots * self.slot_words

    @cached_property
    def state_words(self) -> int:
        return table_words(self.named_keys) + table_words(self.open_keys)

    @cached_property
    def router_off(self) -> int:
        return self.state_off + self.state_words

    @cached_property
    def router_words(self) -> int:
        return area_words(self.deployments, self.nslots)

    @cached_property
    def block_words(self) -> int:
        return self.router_off + self.router_words

    def cell_spans(self, base: int, nroutes: int, nmodels: int) -> list[tuple[int, int]]:
        """The word ranges of the cell at `base` that a writer using `nroutes`
        routes and `nmodels` models touches: the cell's head with the routes,
        then the models."""
        m = base + self.c_models
        return [(base, base + C_ROUTES + nroutes * ROUTE_WORDS), (m, m + nmodels * MODEL_WORDS)]

    @cached_property
    def figure_pairs(self) -> int:
        """Pairs of model indexes an upstream deployment's figures may take
        (gateway/figures.py): from the top of the room down, the public models
        filling it from the bottom (a worker counts no pair that reaches them)."""
        return (self.models - 1) // 2

    def deployment_models(self, pair: int) -> tuple[int, int]:
        """The model indexes of figure pair `pair`: (its attempts, its time to first byte)."""
        m = self.models - 2 * (pair + 1)
        return m, m + 1

    def ring_cell(self, stamp: int) -> int:
        """Slot-relative word offset of the ring cell for Unix second `stamp`."""
        return self.s_ring + (stamp % RING_CELLS) * self.cell_words

    def write(self, header: memoryview) -> None:
        header[H_NSLOTS] = self.nslots
        header[H_SLOT_WORDS] = self.slot_words
        header[H_ROUTES] = self.routes
        header[H_MODELS] = self.models
        header[H_MAX_WORKERS] = self.max_workers
        header[H_STATE_OFF] = self.state_off
        header[H_STATE_WORDS] = self.state_words
        header[H_NAMED_KEYS] = self.named_keys
        header[H_OPEN_KEYS] = self.open_keys
        header[H_DEPLOYMENTS] = self.deployments

    @classmethod
    def read(cls, header: memoryview) -> Geometry:
        return cls(routes=header[H_ROUTES], models=header[H_MODELS],
                   max_workers=header[H_MAX_WORKERS], named_keys=header[H_NAMED_KEYS],
                   open_keys=header[H_OPEN_KEYS], deployments=header[H_DEPLOYMENTS])


def slot_offset(slot: int, slot_words: int) -> int:
    """Word offset of `slot` in the block."""
    return SLOTS_OFF + slot * slot_words
