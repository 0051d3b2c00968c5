"""The seqlock readers of /stats, /metrics and the window: never a torn read,
never a total that goes backwards, a bounded wait (unit, and a real race
between two processes on a real block)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
import uuid
from array import array
from typing import Any

import pytest

from neurohttp.stats import layout as L
from neurohttp.stats.block import StatsBlock
from neurohttp.stats.seqlock import SeqlockTimeout, read_consistent
from neurohttp.stats.snapshot import Snapshot
from neurohttp.stats.window import Meter


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


def test_a_stuck_writer_gets_an_error_not_a_torn_read():
    words = memoryview(array("Q", [1, 7]))  # odd: a writer is mid-update, for good
    calls = []

    def read() -> int:
        calls.append(1)
        return words[1]

    t0 = time.monotonic()
    with pytest.raises(SeqlockTimeout):
        read_consistent(words, 0, read, deadline=0.2)
    assert calls == []  # nothing was read while the writer was inside
    assert time.monotonic() - t0 < 5  # bounded


def test_a_slow_writer_is_waited_for():
    # A writer inside for 300 ms (a fold whose process the scheduler put aside
    # on a busy machine): the reader waits and returns the value written after,
    # never the half-written one (the old reader gave up after 1000 yields).
    words = memoryview(array("Q", [1, 5, 0]))  # odd; word 1 updated, word 2 not yet

    def finish() -> None:
        time.sleep(0.3)
        words[2] = 5
        words[0] += 1

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        assert read_consistent(words, 0, lambda: (words[1], words[2])) == (5, 5)
    finally:
        writer.join(5)


# ---------------------------------------------------------------- the fold race
R = 1000  # what every folded worker counted: totals move in steps of R


def _fold_in_a_loop(name: str, seconds: float, done: Any) -> None:
    """The master's part, as fast as it goes: a worker slot fills, then is folded."""
    block = StatsBlock.attach(name)
    try:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            # a worker's whole life at once: readers skip a free slot, and
            # reserving it is one word (a live worker's counts only grow)
            s = block.slot(1)
            m = Meter(s, ["echo"], block.geometry, ["other", "/health"], now=time.time())
            m.count_response(1, 200, 300)  # one response in the window, per worker
            s[L.S_REQUESTS] = R
            s[L.S_STATUS + 2] = R
            s[L.S_HIST + 3] = R
            assert block.reserve_slot(1, 1) == 1
            block.fold(1)
            with done.get_lock():
                done.value += 1
    finally:
        del s, m
        gc.collect()
        block.close()


def test_totals_never_go_back_while_the_master_folds():
    """One process folds worker slots into the retired slot in a loop while this
    one reads: every read is whole (requests, responses and the histogram agree
    and count whole workers) and no total ever decreases. Fails when the fold
    does not hold the seqlock, and when the reader gives up and returns a read
    it could not check."""
    geo = L.Geometry(routes=4, models=2, max_workers=2, named_keys=16, open_keys=16)
    block = StatsBlock.create(f"neurohttp-test-{uuid.uuid4().hex[:12]}", geo)
    ctx = multiprocessing.get_context("fork")
    done = ctx.Value("q", 0)
    folder = ctx.Process(target=_fold_in_a_loop, args=(block.shm.name, 3.0, done))
    try:
        folder.start()
        last = last_window = reads = 0
        while folder.is_alive() or reads == 0:
            snap = Snapshot(block, ["other", "/health"], ["other", "echo"])
            t = snap.totals
            requests = t[L.S_REQUESTS]
            assert requests % R == 0, f"a worker counted in part: {requests}"
            assert t[L.S_RESPONSES] == requests and sum(snap.hist) == requests
            assert requests >= last, f"requests went back from {last} to {requests}"
            since = snap.route(1, False).count  # the window's since-start, folded too
            assert since == requests // R and since >= last_window
            last, last_window = requests, since
            reads += 1
        folder.join(10)
        assert folder.exitcode == 0
        # both sides really ran against each other
        assert done.value > 50 and reads > 20, (done.value, reads)
        final = Snapshot(block).totals[L.S_REQUESTS]
        assert final == done.value * R
    finally:
        if folder.is_alive() and folder.pid is not None:
            os.kill(folder.pid, 9)
            folder.join(5)
        gc.collect()
        block.unlink()
