"""Reading shared words that a writer updates under a sequence counter."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# A fold by the master or a cell closed by a worker's tick keeps the sequence
# odd for well under a millisecond (the copies only; the sums are done aside).
# A reader that finds it odd or moved yields, then sleeps a little longer each
# time, and gives up only after DEADLINE, a thousand times longer than a fold.
SPIN = 8             # first retries: just yield the CPU
FIRST_SLEEP = 50e-6
MAX_SLEEP = 5e-3
DEADLINE = 2.0


class SeqlockTimeout(RuntimeError):
    """A writer kept the words busy past the deadline: no consistent read."""


def read_consistent(words: memoryview, seq_at: int, read: Callable[[], T],
                    deadline: float = DEADLINE) -> T:
    """Run `read` until no write interleaved with it: the word at `seq_at` was
    even (no writer inside) before, and unchanged after. Never returns a torn
    read: raises SeqlockTimeout when no clean read fits in `deadline` seconds
    (a writer stuck mid-update, or one that never pauses)."""
    seq = words[seq_at]
    if not seq & 1:
        value = read()
        if words[seq_at] == seq:
            return value
    give_up = time.monotonic() + deadline
    pause = FIRST_SLEEP
    tries = 0
    while True:
        tries += 1
        if tries <= SPIN:
            time.sleep(0)
        else:
            if time.monotonic() > give_up:
                raise SeqlockTimeout(f"no consistent read in {deadline:g} s "
                                     f"(sequence word {seq_at} at {words[seq_at]})")
            time.sleep(pause)
            pause = min(pause * 2, MAX_SLEEP)
        seq = words[seq_at]
        if seq & 1:
            continue
        value = read()
        if words[seq_at] == seq:
            return value
