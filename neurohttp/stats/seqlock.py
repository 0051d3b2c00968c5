"""Reading shared words that a writer updates under a sequence counter."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def read_consistent(words: memoryview, seq_at: int, read: Callable[[], T],
                    tries: int = 1000) -> T:
    """Run `read` until no write interleaved with it: the word at `seq_at` was
    even (no writer inside) before, and unchanged after. A writer stuck mid-update
    gets the last read returned: better slightly off than no answer."""
    for _ in range(tries):
        seq = words[seq_at]
        if seq & 1:
            time.sleep(0)
            continue
        value = read()
        if words[seq_at] == seq:
            return value
    return read()
