"""What every client connection of a worker shares, HTTP or WebSocket:
reading paused once whatever the reasons, and the bookkeeping when it ends."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..stats import layout as L
from .host import ConnectionHost


class ClientConnection(asyncio.Protocol):
    """Subclasses set `transport`, `read_paused`, `closed`, `slot`, `host` and
    `drain_waiter`, and say whether our output waits for the client
    (`_output_paused`)."""

    if not TYPE_CHECKING:  # (mypy would take the annotations below for slots of this class)
        __slots__ = ()
    transport: Any
    read_paused: bool
    closed: bool
    slot: Any
    host: ConnectionHost
    drain_waiter: asyncio.Future[None] | None

    def _output_paused(self) -> bool:
        raise NotImplementedError

    # what the worker calls (host.Connection)
    def check_timeouts(self, now: float) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def cut(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

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
        if not self._output_paused() or self.closed:
            return
        waiter = self.drain_waiter = self.host.loop.create_future()
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
        self.host.forget(self)
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))
        return True
