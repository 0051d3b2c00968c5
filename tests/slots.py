"""Read a running server's stats slots straight from its shared-memory block
(no request, so nothing shows in its counters): what the master and the
workers wrote, for tests that watch generations, states and per-worker counts."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from server import Server

from neurohttp.stats import layout as L
from neurohttp.stats.block import block_name


@dataclass(frozen=True)
class Slot:
    index: int
    pid: int
    state: int
    worker_id: int
    generation: int
    requests: int


class Slots:
    """The block of `srv`, mapped read-only; read() lists the used slots."""

    def __init__(self, srv: Server) -> None:
        with open(f"/dev/shm/{block_name(srv.pid_file)}", "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self.words = memoryview(self.map).cast("Q")
        self.nslots = self.words[L.H_NSLOTS]
        self.slot_words = self.words[L.H_SLOT_WORDS]

    def read(self) -> list[Slot]:
        out = []
        for i in range(1, self.nslots):
            base = L.slot_offset(i, self.slot_words)
            w = self.words[base:base + L.S_REQUESTS + 1]
            if w[L.S_STATE] != L.STATE_FREE:
                out.append(Slot(i, w[L.S_PID], w[L.S_STATE], w[L.S_WORKER_ID],
                                w[L.S_GENERATION], w[L.S_REQUESTS]))
        return out

    def generation(self) -> int:
        return self.words[L.H_GENERATION]

    def close(self) -> None:
        self.words.release()
        self.map.close()

    def __enter__(self) -> Slots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
