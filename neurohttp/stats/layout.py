"""Layout of the shared-memory stats block: 64-bit words, no pointers.

    [ header: HEADER_WORDS ][ slot 0: retired totals ][ slot 1 ] ... [ slot N ]

Every slot has the same layout. A worker writes only its own slot (so the
request path takes no lock); the master folds a dead worker's slot into slot 0
under a seqlock (`H_SEQ`) so readers never see a counter counted twice or lost.
"""

from __future__ import annotations

MAGIC = 0x4E455552_4F485454  # "NEUROHTT"
LAYOUT_VERSION = 1

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
S_RESPONSES = 9
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
COUNTERS = [S_REQUESTS, S_RESPONSES, *range(S_STATUS + 1, S_STATUS + 6), S_BYTES_IN,
            S_BYTES_OUT, S_TOKENS_IN, S_TOKENS_OUT, S_STREAMS, S_STREAMS_CANCELLED,
            S_CONNECTIONS, S_LATENCY_SUM_US, S_ERRORS_PARSE]

# ---- gauges (summed over live slots, reset when a worker is folded)
S_ACTIVE_CONNECTIONS = 32
S_STREAMS_ACTIVE = 33
GAUGES = [S_ACTIVE_CONNECTIONS, S_STREAMS_ACTIVE]

# ---- maxima (folded by max)
S_LATENCY_MAX_US = 40
MAXIMA = [S_LATENCY_MAX_US]

# ---- latency histogram: quarter-octave buckets in microseconds, 16 us .. ~67 s.
# Bucket i counts latencies <= BUCKET_BOUNDS_US[i]; the last bucket is +Inf.
BUCKET_BOUNDS_US: list[int] = [round(2 ** (i / 4)) for i in range(16, 105)]
S_HIST = 64
N_BUCKETS = len(BUCKET_BOUNDS_US) + 1
HIST_END = S_HIST + N_BUCKETS

SLOT_WORDS = 1024      # room for the windowed figures that come later
DEFAULT_WORKER_SLOTS = 128

# ---- text at the end of a slot (never summed): in a worker's slot, why it
# failed or what it was stuck on, for the master to log; in slot 0, the
# master's own facts as JSON (config path) for `neurohttpd status`.
S_TEXT = 896
TEXT_BYTES = (SLOT_WORDS - S_TEXT) * 8

assert HIST_END <= S_TEXT


def slot_offset(slot: int, slot_words: int = SLOT_WORDS) -> int:
    """Word offset of `slot` in the block."""
    return HEADER_WORDS + slot * slot_words


def block_words(nslots: int, slot_words: int = SLOT_WORDS) -> int:
    return HEADER_WORDS + nslots * slot_words
