"""The shared-memory stats block: creation, stale-block recovery, folding, unlink.

Workers inherit the mapping through fork and never attach by name, so the
request path only touches a memoryview of 64-bit words.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from multiprocessing import resource_tracker, shared_memory

from . import layout as L
from .window import fold_window


class BlockInUse(Exception):
    """The named block belongs to a master that is still alive."""


def block_name(pid_file: str) -> str:
    """A stable name per pid file, so a restarted master finds a stale block."""
    digest = hashlib.sha1(os.path.abspath(pid_file).encode()).hexdigest()[:16]
    return f"neurohttp-{digest}"


def _open(name: str, create: bool, size: int = 0) -> shared_memory.SharedMemory:
    # Python < 3.13 registers every block with the resource tracker, which then
    # unlinks or warns about it behind our back; the master owns the lifetime.
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, create=create, size=size, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *a, **k: None
    try:
        return shared_memory.SharedMemory(name, create=create, size=size)
    finally:
        resource_tracker.register = register


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: it owns nothing any more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True


class StatsBlock:
    """A mapped stats block; `words` is the whole block as unsigned 64-bit words."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.shm = shm
        self.owner = owner
        self.stale_pid = -1  # create(): >= 0 when a dead master's block was replaced
        self.words = shm.buf.cast("Q")
        self.nslots = self.words[L.H_NSLOTS]
        self.slot_words = self.words[L.H_SLOT_WORDS]

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, worker_slots: int = L.DEFAULT_WORKER_SLOTS) -> StatsBlock:
        """Create the block; replace a stale one whose master is dead."""
        nslots = worker_slots + 1
        size = L.block_words(nslots) * 8
        stale_pid = -1
        try:
            shm = _open(name, create=True, size=size)
        except FileExistsError:
            old = cls.attach(name)
            pid = old.words[L.H_MASTER_PID] if old.valid() else 0
            old.close()
            if pid and pid != os.getpid() and pid_alive(pid):
                raise BlockInUse(f"stats block /dev/shm/{name} belongs to running master pid {pid}") from None
            _unlink(name)
            stale_pid = pid
            shm = _open(name, create=True, size=size)
        blk = cls(shm, owner=True)
        blk.stale_pid = stale_pid
        w = blk.words
        w[L.H_NSLOTS] = nslots
        w[L.H_SLOT_WORDS] = L.SLOT_WORDS
        blk.nslots, blk.slot_words = nslots, L.SLOT_WORDS
        w[L.H_VERSION] = L.LAYOUT_VERSION
        w[L.H_MASTER_PID] = os.getpid()
        w[L.H_STARTED] = int(time.time())
        w[L.H_MAGIC] = L.MAGIC
        return blk

    @classmethod
    def attach(cls, name: str) -> StatsBlock:
        """Map an existing block read-mostly (CLI status, tests)."""
        return cls(_open(name, create=False), owner=False)

    def valid(self) -> bool:
        w = self.words
        return (len(w) > L.HEADER_WORDS and w[L.H_MAGIC] == L.MAGIC
                and w[L.H_VERSION] == L.LAYOUT_VERSION)

    def close(self) -> None:
        try:
            self.words.release()
            self.shm.close()
        except (BufferError, ValueError):
            pass

    def unlink(self) -> None:
        name = self.shm.name
        self.close()
        _unlink(name)

    # ------------------------------------------------------------ slots
    def slot(self, index: int) -> memoryview:
        """The words of one slot (index 0 is the retired totals)."""
        start = L.slot_offset(index, self.slot_words)
        return self.words[start:start + self.slot_words]

    def reserve_slot(self, worker_id: int, generation: int) -> int:
        """Master, before fork: take a free worker slot; -1 if none is free.

        The master writes the child's pid into S_PID after the fork.
        """
        for i in range(1, self.nslots):
            s = self.slot(i)
            if s[L.S_STATE] == L.STATE_FREE:
                s[L.S_WORKER_ID] = worker_id
                s[L.S_STARTED] = int(time.time())
                s[L.S_HEARTBEAT] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000
                s[L.S_GENERATION] = generation
                s[L.S_STATE] = L.STATE_STARTING
                return i
        return -1

    def fold(self, index: int) -> None:
        """Master: add a dead worker's counters to the retired slot and free it.

        Readers retry while H_SEQ is odd, so the move is atomic to them.
        """
        w = self.words
        src = self.slot(index)
        dst = self.slot(0)
        w[L.H_SEQ] += 1
        try:
            for k in L.COUNTERS:
                dst[k] += src[k]
            for k in range(L.S_HIST, L.HIST_END):
                dst[k] += src[k]
            for k in L.MAXIMA:
                if src[k] > dst[k]:
                    dst[k] = src[k]
            fold_window(src, dst, int(time.time()))
            src[:] = memoryview(bytes(self.slot_words * 8)).cast("Q")
        finally:
            w[L.H_SEQ] += 1

    def write_text(self, index: int, text: str) -> None:
        """Store a short UTF-8 text in a slot's text area (truncated, NUL-padded)."""
        data = text.encode("utf-8", "replace")[:L.TEXT_BYTES]
        start = (L.slot_offset(index, self.slot_words) + L.S_TEXT) * 8
        buf = self.shm.buf
        buf[start:start + L.TEXT_BYTES] = data.ljust(L.TEXT_BYTES, b"\0")

    def read_text(self, index: int) -> str:
        start = (L.slot_offset(index, self.slot_words) + L.S_TEXT) * 8
        raw = bytes(self.shm.buf[start:start + L.TEXT_BYTES])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def live_slots(self) -> list[int]:
        return [i for i in range(1, self.nslots) if self.slot(i)[L.S_STATE] != L.STATE_FREE]


def _unlink(name: str) -> None:
    try:
        os.unlink(f"/dev/shm/{name.lstrip('/')}")
    except FileNotFoundError:
        pass
