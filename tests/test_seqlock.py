"""The seqlock reader shared by /stats, /metrics and the window (unit)."""

from __future__ import annotations

from array import array

from neurohttp.stats.seqlock import read_consistent


def test_a_read_that_a_write_interleaved_with_is_retried():
    words = memoryview(array("Q", [0, 10]))
    seen = []

    def read() -> int:
        value = words[1]
        seen.append(value)
        if len(seen) == 1:  # a writer updates the value during the first read
            words[0] += 2
            words[1] = 20
        return value

    assert read_consistent(words, 0, read) == 20
    assert seen == [10, 20]


def test_reads_wait_while_a_writer_is_inside():
    words = memoryview(array("Q", [1, 7]))  # odd: a writer is mid-update
    calls = []

    def read() -> int:
        calls.append(1)
        return words[1]

    # stuck writer: no read while odd, then one last read rather than no answer
    assert read_consistent(words, 0, read, tries=5) == 7
    assert len(calls) == 1
