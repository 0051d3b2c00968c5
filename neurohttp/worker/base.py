"""What every client connection of a worker shares, HTTP or WebSocket:
reading paused once whatever the reasons, and the bookkeeping when it ends."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..stats import layout as L


class ClientConnection(asyncio.Protocol):
    """Subclasses set `transport`, `read_paused`, `write_paused`, `closed`,
    `slot`, `w` (the worker) and `drain_waiter`."""

    if not TYPE_CHECKING:  # (mypy would take the annotations below for slots of this class)
        __slots__ = ()
    transport: Any
    read_paused: bool
    closed: bool
    slot: Any
    w: Any
    drain_waiter: asyncio.Future | None
    write_paused: bool

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        """Wait while the client reads slower than we write (resume_writing or
        the connection's end wakes us; the end raises ConnectionResetError)."""
        if not self.write_paused or self.closed:
            return
        waiter = self.drain_waiter = self.w.loop.create_future()
        try:
            await waiter
        finally:
            self.drain_waiter = None

    def _forget(self) -> bool:
        """The connection is gone: count it out, wake a writer waiting to drain.
        False if that was done already."""
        if self.closed:
            return False
        self.closed = True
        self.slot[L.S_ACTIVE_CONNECTIONS] -= 1
        self.w.connections.discard(self)
        if self.w.firewall is not None:
            self.w.firewall.on_close(self.transport)  # its per-IP count, if it had one
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))
        return True
