"""Accepting connections, and refusing them with 503 when the worker is full.

Normally the event loop accepts on each listening socket (uvloop's accept in C,
on a duplicate of the socket). A worker is full when it holds max_connections
(capped by the open-file limit, see fdlimit.py) or is short of descriptors.
Then the loop's own accept stops and the `Gate` reads the listening sockets
itself: every connection waiting there is accepted, answered 503 with
Retry-After and closed at once, so a full worker costs a client one round trip,
not a silent reset (what libuv does at EMFILE) or a wait in the accept queue.
At EMFILE the gate gives up a spare descriptor it keeps for that, accepts and
refuses one connection, and opens the spare again (the trick of nginx and
libuv); without a spare it stops reading the sockets for a moment instead of
spinning on accept(). EMFILE and "full" are logged at most once a second.
The loop's accept comes back once the worker is under 15/16 of its cap and has
descriptors to spare.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from time import monotonic
from typing import Any

from ..logs import Every
from ..protocol import serialize as ser
from .connection import busy_response

log = logging.getLogger("neurohttp")

REFUSE_BATCH = 64     # connections refused per wake-up before the loop runs other work
PAUSE_SECONDS = 0.5   # accept() keeps failing (no spare descriptor): try again after this
LOW_FDS = 8           # fewer free descriptors than this: the worker is full
# accept() errors that concern the one connection only (accept(2): retry)
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                        errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                        errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EINTR})


class Spare:
    """A descriptor held open, to be given up when accept() fails with EMFILE."""

    def __init__(self) -> None:
        self.fd = self._open()

    @staticmethod
    def _open() -> int:
        try:
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def release(self) -> bool:
        if self.fd < 0:
            self.fd = self._open()  # one may have freed up since
            if self.fd < 0:
                return False
        os.close(self.fd)
        self.fd = -1
        return True

    def restore(self) -> None:
        if self.fd < 0:
            self.fd = self._open()

    def headroom(self, n: int) -> bool:
        """Whether n more descriptors could be opened now (probed, then closed)."""
        fds: list[int] = []
        try:
            for _ in range(n):
                fds.append(os.dup(self.fd) if self.fd >= 0 else self._open_or_raise())
            return True
        except OSError:
            return False
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _open_or_raise() -> int:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Acceptor:
    """One listening socket: the loop's server on a duplicate of it, or the gate's
    reader on the socket itself while the worker is full."""

    def __init__(self, gate: Gate, sock: socket.socket, factory: Callable[[], Any],
                 backlog: int, server_kwargs: dict[str, Any] | None = None) -> None:
        self.gate = gate
        # the loop's TLS arguments for a TLS listener (tlsconfig.server_kwargs)
        self.server_kwargs = server_kwargs or {}
        self.loop = gate.loop
        self.sock = sock
        self.factory = factory
        self.backlog = backlog
        self.server: asyncio.AbstractServer | None = None
        self.reading = False
        self.closed = False

    async def serve(self) -> None:
        """Start (or restart) the loop's accept; closing the server closes only the dup."""
        server = await self.loop.create_server(self.factory, sock=self.sock.dup(),
                                               backlog=self.backlog, **self.server_kwargs)
        if self.closed or self.gate.full or self.server is not None:
            server.close()  # things changed while it started
            return
        self.server = server

    def refuse(self) -> None:
        """The worker is full: stop the loop's accept and answer 503 ourselves."""
        if self.closed:
            return
        if self.server is not None:
            self.server.close()
            self.server = None
        self._read(True)

    def admit(self) -> None:
        """Room again: back to the loop's accept."""
        if self.closed:
            return
        self._read(False)
        if self.server is None:
            self.loop.create_task(self.serve())

    def close(self) -> None:
        """For good (the worker drains): the socket's last copy in this process goes."""
        self.closed = True
        self._read(False)
        if self.server is not None:
            self.server.close()
            self.server = None
        self.sock.close()

    def _read(self, on: bool) -> None:
        if on and not self.reading:
            self.sock.setblocking(False)
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
        elif not on and self.reading:
            self.loop.remove_reader(self.sock.fileno())
        self.reading = on

    def _pause(self) -> None:
        """accept() cannot proceed: leave the socket alone for a moment (no spinning)."""
        self._read(False)

        def again() -> None:
            if self.gate.full and not self.closed and self.server is None:
                self._read(True)
        self.loop.call_later(PAUSE_SECONDS, again)

    def _on_readable(self) -> None:
        gate = self.gate
        for _ in range(REFUSE_BATCH):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _TRANSIENT:
                    continue
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    gate.note_emfile()
                    spared = self._accept_with_spare()
                    if spared is None:
                        self._pause()
                        return
                    conn = spared
                else:
                    log.error("worker %d: accept failed: %s", gate.worker_id, e)
                    self._pause()
                    return
            if self.server_kwargs:
                conn.close()  # a TLS listener: no answer can be read before a handshake
            else:
                gate.refuse_one(conn)

    def _accept_with_spare(self) -> socket.socket | None:
        spare = self.gate.spare
        if not spare.release():
            return None
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return None
        finally:
            spare.restore()  # (after the refused connection is closed it surely succeeds)
        return conn


class Gate:
    """Whether the worker takes new connections, for all its acceptors.

    `open_count()` is how many connections the worker holds; `refused(nbytes,
    t0)` counts a connection answered 503 here (connection.count_refusal)."""

    def __init__(self, worker_id: int, max_connections: int, open_count: Callable[[], int],
                 refused: Callable[[int, float], None]) -> None:
        self.worker_id = worker_id
        self.max_connections = max_connections
        self.open_count = open_count
        self.refused = refused
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # (listen sets it)
        self.acceptors: list[Acceptor] = []
        self.spare = Spare()
        self.full = False
        self.short = False          # short of descriptors (found by the tick's probe)
        self._said_full = Every()
        self._said_emfile = Every()

    async def listen(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                     factory: Callable[[], Any], backlog: int,
                     server_kwargs: list[dict[str, Any]] | None = None) -> None:
        self.loop = loop
        kwargs = server_kwargs or [{}] * len(sockets)
        for sock, kw in zip(sockets, kwargs, strict=True):
            acc = Acceptor(self, sock, factory, backlog, kw)
            self.acceptors.append(acc)
            await acc.serve()

    def close(self) -> None:
        for acc in self.acceptors:
            acc.close()
        self.spare.close()

    # ------------------------------------------------------------ state
    def opened(self, count: int) -> None:
        """A connection was accepted; `count` are open now."""
        if count >= self.max_connections and not self.full:
            self._set_full(f"{count} connections (max_connections {self.max_connections})")

    def released(self, count: int) -> None:
        """A connection ended; `count` are open now."""
        if self.full and not self.short and count <= self.max_connections * 15 // 16:
            self._set_open()

    def tick(self) -> None:
        """Probe for free descriptors (other code may use them up: upstream pools,
        plugins); while full, also retry the spare and see whether room came back."""
        short = not self.spare.headroom(LOW_FDS)
        if short and not self.short:
            self.short = True
            self.note_emfile()
            if not self.full:
                self._set_full("out of file descriptors")
        elif not short and self.short:
            self.short = False
        if self.full:
            self.spare.restore()
            self.released(self.open_count())

    def _set_full(self, why: str) -> None:
        self.full = True
        held = self._said_full.due()
        if held is not None:
            log.warning("worker %d is full (%s): new connections get 503%s",
                        self.worker_id, why, f" ({held} more times)" if held else "")
        for acc in self.acceptors:
            acc.refuse()

    def _set_open(self) -> None:
        self.full = False
        for acc in self.acceptors:
            acc.admit()

    def note_emfile(self) -> None:
        held = self._said_emfile.due()
        if held is not None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.error("worker %d: out of file descriptors (EMFILE, RLIMIT_NOFILE %d): new "
                      "connections get 503%s", self.worker_id, soft,
                      f" ({held} more times)" if held else "")

    # ------------------------------------------------------------ refusing
    def refuse_one(self, conn: socket.socket) -> None:
        """Answer 503 and close at once: the socket holds no descriptor afterwards."""
        t0 = monotonic()
        resp = busy_response()
        data = ser.response_head(resp.status, resp.content_type, resp.headers, len(resp.body),
                                 False, False) + resp.body
        try:
            conn.setblocking(False)
            conn.send(data)
            conn.shutdown(socket.SHUT_WR)
            # read what the client sent, so that close() sends a FIN, not a reset
            # that could destroy the answer before the client reads it
            for _ in range(4):
                if not conn.recv(65536):
                    break
        except OSError:
            pass
        finally:
            conn.close()
        self.refused(len(data), t0)
