"""The shared-memory stats block: creation, stale-block recovery, folding, unlink.

Workers inherit the mapping through fork and never attach by name, so the
request path only touches a memoryview of 64-bit words.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import time
from array import array
from multiprocessing import resource_tracker, shared_memory

from ..shared.deployments import DeploymentTable
from ..shared.mutex import buffer_address
from ..shared.state import SharedState
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
    """A mapped stats block; `words` is the whole block as unsigned 64-bit words,
    `geometry` its sizes as its header records them."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.shm = shm
        self.owner = owner
        self.stale_pid = -1  # create(): >= 0 when a dead master's block was replaced
        self.words = self._buf.cast("Q")
        self._read_geometry()
        self._state: SharedState | None = None
        self._router: DeploymentTable | None = None

    @property
    def _buf(self) -> memoryview:
        buf = self.shm.buf
        assert buf is not None, "the block is closed"
        return buf

    def _read_geometry(self) -> None:
        self.geometry = L.Geometry.read(self.words) if self.valid() else L.Geometry()
        self.nslots = self.words[L.H_NSLOTS]
        self.slot_words = self.words[L.H_SLOT_WORDS]

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, geometry: L.Geometry | None = None) -> StatsBlock:
        """Create the block with these sizes; replace a stale one whose master is dead."""
        geo = geometry or L.Geometry()
        size = geo.block_words * 8
        stale_pid = -1
        try:
            shm = _open(name, create=True, size=size)
        except FileExistsError:
            old = cls.attach(name)
            # the magic alone: a running master of another layout version owns its block too
            w = old.words
            pid = w[L.H_MASTER_PID] if len(w) > L.HEADER_WORDS and w[L.H_MAGIC] == L.MAGIC else 0
            old.close()
            if pid and pid != os.getpid() and pid_alive(pid):
                raise BlockInUse(f"stats block /dev/shm/{name} belongs to running master pid {pid}") from None
            _unlink(name)
            stale_pid = pid
            shm = _open(name, create=True, size=size)
        blk = cls(shm, owner=True)
        blk.stale_pid = stale_pid
        w = blk.words
        geo.write(w)
        SharedState.init(blk._state_buf(), geo.named_keys, geo.open_keys)
        buf = blk._router_buf(geo)
        DeploymentTable.init(buf.cast("q"), buffer_address(buf), geo.deployments, geo.nslots)
        w[L.H_VERSION] = L.LAYOUT_VERSION
        w[L.H_MASTER_PID] = os.getpid()
        w[L.H_STARTED] = int(time.time())
        w[L.H_MAGIC] = L.MAGIC
        blk._read_geometry()
        return blk

    @classmethod
    def attach(cls, name: str) -> StatsBlock:
        """Map an existing block read-mostly (CLI status, tests)."""
        return cls(_open(name, create=False), owner=False)

    def valid(self) -> bool:
        w = self.words
        return (len(w) > L.HEADER_WORDS and w[L.H_MAGIC] == L.MAGIC
                and w[L.H_VERSION] == L.LAYOUT_VERSION)

    def _state_buf(self) -> memoryview:
        geo = self.geometry if self.valid() else None
        off = self.words[L.H_STATE_OFF] if geo is None else geo.state_off
        n = self.words[L.H_STATE_WORDS] if geo is None else geo.state_words
        return self._buf[off * 8:(off + n) * 8]

    @property
    def state(self) -> SharedState:
        """The shared state (exact counters, limiters) of this block, for any
        process the master forked after creating it."""
        if self._state is None:
            g = self.geometry
            self._state = SharedState(self._state_buf(), g.named_keys, g.open_keys)
        return self._state

    def _router_buf(self, geo: L.Geometry | None = None) -> memoryview:
        geo = geo or self.geometry
        return self._buf[geo.router_off * 8:(geo.router_off + geo.router_words) * 8]

    @property
    def router(self) -> DeploymentTable:
        """The router's records (shared/deployments.py), for any process the
        master forked after creating the block."""
        if self._router is None:
            buf = self._router_buf()
            self._router = DeploymentTable(buf.cast("q"), buffer_address(buf))
        return self._router

    def close(self) -> None:
        if self._state is not None:
            self._state.release()
            self._state = None
        if self._router is not None:
            self._router.w.release()
            self._router = None
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

        The new retired slot is computed aside (nobody else writes slot 0 or a
        dead worker's slot), then copied in and the dead slot marked free under
        the seqlock: readers retry while H_SEQ is odd or has moved, so the move
        is atomic to them, and the odd stretch is a few copies long.
        """
        w = self.words
        src = self.slot(index)
        dst = self.slot(0)
        geo = self.geometry
        # the words the fold changes in slot 0: the head, and the window's prefix
        nr = max(src[L.S_WIN_ROUTES], dst[L.S_WIN_ROUTES])
        nm = max(src[L.S_WIN_MODELS], dst[L.S_WIN_MODELS])
        spans = [(0, L.S_TEXT)]
        for c in range(-1, L.RING_CELLS):  # CUM, then the cells
            spans += geo.cell_spans(geo.s_ring + c * geo.cell_words, nr, nm)
        new = memoryview(array("Q", bytes(self.slot_words * 8)))
        for a, b in spans:
            new[a:b] = dst[a:b]
        for k in L.COUNTERS:
            new[k] += src[k]
        for k in range(L.S_HIST, L.HIST_END):
            new[k] += src[k]
        for k in L.MAXIMA:
            if src[k] > new[k]:
                new[k] = src[k]
        new[L.S_WIN_ROUTES], new[L.S_WIN_MODELS] = nr, nm
        fold_window(src, new, int(time.time()), geo)
        w[L.H_SEQ] += 1
        try:
            for a, b in spans:
                dst[a:b] = new[a:b]
            src[L.S_STATE] = L.STATE_FREE  # readers skip it from here
        finally:
            w[L.H_SEQ] += 1
        self._clear_slot(index)

    def clear_models(self, models: list[int]) -> None:
        """Master: zero model indexes `models` in the retired slot (since start
        and every cell), so that what a deployment that left counted is not
        read as the figures of the one given its indexes next. Live slots
        hold none of it: their writers use the indexes only once given."""
        geo = self.geometry
        dst = self.slot(0)
        z = memoryview(bytes(L.MODEL_WORDS * 8)).cast("Q")
        w = self.words
        w[L.H_SEQ] += 1
        try:
            for c in range(-1, L.RING_CELLS):  # CUM, then the cells
                base = geo.s_ring + c * geo.cell_words + geo.c_models
                for m in models:
                    if m < dst[L.S_WIN_MODELS]:  # (past it: never written)
                        a = base + m * L.MODEL_WORDS
                        dst[a:a + L.MODEL_WORDS] = z
        finally:
            w[L.H_SEQ] += 1

    def _clear_slot(self, index: int) -> None:
        """Zero a freed slot, handing its pages back to the system: a slot
        costs memory only while a worker uses it."""
        start = L.slot_offset(index, self.slot_words) * 8
        size = self.slot_words * 8
        try:
            self.shm._mmap.madvise(mmap.MADV_REMOVE, start, size)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            self.slot(index)[:] = memoryview(bytes(size)).cast("Q")

    def write_text(self, index: int, text: str) -> None:
        """Store a short UTF-8 text in a slot's text area (truncated, NUL-padded)."""
        data = text.encode("utf-8", "replace")[:L.TEXT_BYTES]
        start = (L.slot_offset(index, self.slot_words) + L.S_TEXT) * 8
        buf = self._buf
        buf[start:start + L.TEXT_BYTES] = data.ljust(L.TEXT_BYTES, b"\0")

    def read_text(self, index: int) -> str:
        start = (L.slot_offset(index, self.slot_words) + L.S_TEXT) * 8
        raw = bytes(self._buf[start:start + L.TEXT_BYTES])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def live_slots(self) -> list[int]:
        return [i for i in range(1, self.nslots) if self.slot(i)[L.S_STATE] != L.STATE_FREE]


def _unlink(name: str) -> None:
    try:
        os.unlink(f"/dev/shm/{name.lstrip('/')}")
    except FileNotFoundError:
        pass
