"""What a client connection may use of the worker that holds it: the host
interface. Connections (worker/connection.py, websocket.py, acceptor.py's
refusals) are typed against these protocols and never import the Worker;
the composition root (worker/worker.py) is the one implementation.

The host registers and forgets connections (the worker's set, which its sweep,
drain and cap act on), says whether it drains, dispatches requests (the App),
and lends the counters a connection writes (its stats slot and the meter's
current cell) and the access-log sink. `register` is where an accepted
connection may be refused (a full worker, or the firewall's peer rules), `forget` where its end is noted.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..messages import Request, Response


class Connection(Protocol):
    """What the worker calls on each of its connections."""

    transport: Any  # (the firewall's per-IP count is keyed by it: it outlives a WS upgrade)

    def check_timeouts(self, now: float) -> None:
        """The sweep, twice a second: act on what is due."""

    def shutdown(self) -> None:
        """The worker drains: end the connection after the answer in flight."""

    def cut(self) -> None:
        """The drain deadline passed: end a stream in flight with its last word."""

    def abort(self) -> None:
        """Close at once."""


class Dispatcher(Protocol):
    """The application as a connection uses it (app.App)."""

    route_index: dict[str | bytes, int]
    @property
    def max_upload(self) -> int:
        """> 0: a route streams its body (protocol/h1stream.py)."""

    def handle(self, req: Request) -> Any: ...

    def upload_limit(self, req: Any) -> int: ...


class RouteCells(Protocol):
    """The per-second window's current cell (stats/window.py Meter)."""

    cur: int


class AccessSink(Protocol):
    def record(self, req: Any, status: int, nbytes: int, t0: float) -> None: ...


class ConnectionHost(Protocol):
    # (read-only properties: a host may hold narrower types than these)
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def slot(self) -> Any:
        """This worker's stats slot: int64 words (stats/layout.py)."""

    @property
    def meter(self) -> RouteCells: ...

    @property
    def app(self) -> Dispatcher: ...

    @property
    def access_log(self) -> AccessSink | None: ...

    @property
    def draining(self) -> bool: ...

    def register(self, conn: Connection, peer: str) -> Response | None:
        """A connection from `peer` (its IP) was accepted. None: serve it; else
        the answer to send before closing it (503 when the worker is full)."""

    def forget(self, conn: Connection) -> None:
        """The connection is gone."""

    def handover(self, old: Connection, new: Connection) -> None:
        """The same socket is served by a new connection object (a WebSocket
        taking over from HTTP): no accept, no close."""
