"""Reading paused at most once per transport, whichever reason asks."""

from __future__ import annotations

import asyncio
from typing import Any


class PausableReader(asyncio.Protocol):
    """A protocol whose reading several reasons may pause (output backlog,
    queued requests, a pending upgrade). Subclasses set `transport`,
    `read_paused` and `closed`."""

    __slots__ = ()
    transport: Any
    read_paused: bool
    closed: bool

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
