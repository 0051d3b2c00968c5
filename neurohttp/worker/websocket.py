"""WebSocket connections (RFC 6455) after the HTTP/1.1 upgrade.

wsproto does the framing; this module does the socket side: the handshake
check and the 101 answer, text messages handed to a session one at a time,
ping/pong, the close handshake, back-pressure and shutdown.

`HttpConnection` hands the transport over (`transport.set_protocol`) when a
handler answers with `WebSocketUpgrade`; from then on this object gets the
socket's callbacks and owns the connection's place in the host's
connections (worker/host.py). The opening handshake's check is sans-IO
(protocol/ws_handshake.py), and so is its 101 (protocol/serialize.py).

Close codes: a client's close is echoed (1000 ...); a frame wsproto cannot
accept closes with the code wsproto names (1002 protocol error, 1007 invalid
UTF-8); a binary message gets 1003; a message over `max_body_bytes` 1009;
a server going away 1001, and 1001 "idle timeout" after `ws_idle_timeout`
without a message either way; a client silent for `ws_ping_s` is pinged, and
one that has not answered by the next ping is closed with 1011. A client that
leaves an answer unread for `send_timeout` is dropped, as on HTTP.

Back-pressure: while unsent output is over `write_buffer_bytes` nothing more is
read, so pongs and error replies cannot pile up behind a client that sends
without reading; nor while more than `max_pipeline` messages, or more than
`max_body_bytes` of them, wait to be answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic
from typing import Any, Protocol

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from ..messages import Request, WebSocketUpgrade
from ..protocol.settings import ConnectionSettings
from ..stats import layout as L
from .base import ClientConnection
from .host import ConnectionHost

log = logging.getLogger("neurohttp")

CLOSE_WAIT_SECONDS = 5.0  # after our Close, wait this long for the client's
PING_PAYLOAD = b"neurohttp"


class Session(Protocol):
    """What a WebSocket endpoint implements: one call per text message, never
    two at once. It is cancelled if the connection is lost."""

    async def on_text(self, ws: WebSocketConnection, text: str) -> None: ...

    def on_cut(self, ws: WebSocketConnection) -> None:
        """The server's shutdown deadline passed during on_text: send a last word."""


class WebSocketConnection(ClientConnection):
    """One upgraded connection."""

    def __init__(self, settings: ConnectionSettings, host: ConnectionHost, transport: Any,
                 req: Request, up: WebSocketUpgrade) -> None:
        self.settings = settings
        self.host = host
        self.slot = host.slot
        self.transport = transport
        self.request = req
        self.session: Session = up.session()
        self.ws = Connection(ConnectionType.SERVER)
        self.inbox: deque[str] = deque()
        self.inbox_len = 0          # characters waiting in `inbox`
        self.partial: list[str] = []
        self.partial_len = 0
        self.max_message = settings.max_body_bytes
        self.runner: asyncio.Task[None] | None = None
        self.write_paused = False
        self.read_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.going_away = False     # the worker drains: close once the message in hand is done
        self.close_deadline = 0.0   # we sent Close: hang up if no answer by then
        self.idle_since = monotonic()  # the last message either way (ws_idle_timeout)
        self.heard = self.idle_since  # the last bytes from the client (ws_ping_s)
        self.ping_sent = 0.0          # our ping still unanswered since then
        self.stalled_since = 0.0      # when unsent output last went over the bound

    def start(self, leftover: bytes) -> None:
        """Take the socket's callbacks (the host already counts this connection)
        and the bytes that followed the Upgrade request."""
        transport = self.transport
        transport.set_protocol(self)
        if leftover:
            self.data_received(leftover)
        if not self.read_paused:  # (the leftover may have filled the inbox)
            transport.resume_reading()  # the HTTP side paused it when the Upgrade arrived
        if self.host.draining:
            self.shutdown()  # switched while the worker stops: answer what came, then 1001

    # ------------------------------------------------------------ asyncio callbacks
    def data_received(self, data: bytes) -> None:
        self.slot[L.S_BYTES_IN] += len(data)
        self.heard = monotonic()
        ws = self.ws
        if self.closed or ws.state is ConnectionState.CLOSED:
            return
        ws.receive_data(data)
        for ev in ws.events():
            if isinstance(ev, TextMessage):
                self.partial_len += len(ev.data)
                if self.partial_len > self.max_message:
                    self._fail(CloseReason.MESSAGE_TOO_BIG, "message too big")
                    return
                self.partial.append(ev.data)
                if ev.message_finished:
                    text = "".join(self.partial)
                    self.partial.clear()
                    self.partial_len = 0
                    self._deliver(text)
            elif isinstance(ev, Ping):
                if ws.state is ConnectionState.OPEN:
                    self._write(ws.send(ev.response()))
            elif isinstance(ev, CloseConnection):
                self._on_close(ev)
                return
            elif isinstance(ev, Pong):
                self.ping_sent = 0.0
            elif isinstance(ev, BytesMessage):
                self._fail(CloseReason.UNSUPPORTED_DATA, "only text messages are accepted")
                return

    def eof_received(self) -> bool | None:
        return None  # TCP closed without a Close frame (1006): just close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._forget():
            return
        self._clear_inbox()
        self._cancel_runner()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.stalled_since = monotonic()
        self._pause_reading()  # what we would read may need an answer (a pong at least)

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._inbox_full():
            self._resume_reading()

    def _output_paused(self) -> bool:
        return self.write_paused

    # ------------------------------------------------------------ for sessions
    @property
    def open(self) -> bool:
        return not self.closed and self.ws.state is ConnectionState.OPEN

    def send_text(self, text: str) -> None:
        """Send one text message (dropped once the connection is closing)."""
        if self.open:
            self._write(self.ws.send(TextMessage(data=text)))

    # ------------------------------------------------------------ internals
    def _write(self, data: bytes | bytearray) -> None:
        self.slot[L.S_BYTES_OUT] += len(data)
        self.transport.write(data)

    def _deliver(self, text: str) -> None:
        if self.going_away:
            return  # closing: take no new work
        self.inbox.append(text)
        self.inbox_len += len(text)
        self.idle_since = monotonic()
        if self._inbox_full():
            self._pause_reading()  # a client queueing prompts waits for the answers
        if self.runner is None:
            self.runner = self.host.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.inbox and self.open:
                text = self.inbox.popleft()
                self.inbox_len -= len(text)
                if self.read_paused and not self.write_paused and not self._inbox_full():
                    self._resume_reading()
                await self.session.on_text(self, text)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("websocket session failed")
            self._fail(CloseReason.INTERNAL_ERROR, "internal error")
            return
        finally:
            self.runner = None
            self.idle_since = monotonic()
        if self.going_away and self.open:
            self.close(CloseReason.GOING_AWAY, "server shutting down")

    def _inbox_full(self) -> bool:
        return len(self.inbox) >= self.settings.max_pipeline or self.inbox_len > self.max_message

    def _cancel_runner(self) -> None:
        if self.runner is not None and not self.runner.done():
            self.runner.cancel()

    def _on_close(self, ev: CloseConnection) -> None:
        state = self.ws.state
        if state is ConnectionState.REMOTE_CLOSING:
            # the client closes: stop its work, echo the code, hang up (RFC 6455 7.1.1)
            self._cancel_runner()
            self._write(self.ws.send(ev.response()))
            self.transport.close()
        elif state is ConnectionState.CLOSED:
            self.transport.close()  # the answer to our Close
        else:
            # wsproto reports a frame it refuses as a close carrying the code to send
            self.slot[L.S_ERRORS_PARSE] += 1
            self._fail(ev.code, ev.reason or "protocol error")

    def _fail(self, code: int, reason: str) -> None:
        """Close at once with `code` after a bad frame or message."""
        self._cancel_runner()
        if self.ws.state is ConnectionState.OPEN:
            try:
                self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
            except LocalProtocolError:
                pass
        self.transport.close()

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the close handshake; the client's Close (or a timeout) ends it."""
        if self.ws.state is not ConnectionState.OPEN or self.closed:
            return
        self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
        self.close_deadline = monotonic() + CLOSE_WAIT_SECONDS

    # ------------------------------------------------------------ worker hooks
    def check_timeouts(self, now: float) -> None:
        if self.close_deadline:
            if now > self.close_deadline and not self.closed:
                self.transport.close()
            return  # closing: nothing else is due
        st = self.settings
        if self.write_paused:
            # the client leaves our answer unread: as on HTTP, drop it after send_timeout
            if now - self.stalled_since > st.send_timeout:
                self.transport.abort()
            return
        if not self.open:
            return
        ping = st.ws_ping_s
        if ping:
            if self.ping_sent:
                if now - self.ping_sent > ping:
                    self._fail(CloseReason.INTERNAL_ERROR, "ping timeout")  # 1011, as websockets does
                    return
            elif now - self.heard > ping:
                self.ping_sent = now
                self._write(self.ws.send(Ping(payload=PING_PAYLOAD)))
        idle = st.ws_idle_timeout
        if idle and self.runner is None and not self.inbox and now - self.idle_since > idle:
            self.close(CloseReason.GOING_AWAY, "idle timeout")

    def shutdown(self) -> None:
        """The worker drains: finish the message being answered, then close 1001.
        (Called again on every pass of the drain loop: idempotent.)"""
        self.going_away = True
        self._clear_inbox()
        if self.runner is None:
            self.close(CloseReason.GOING_AWAY, "server shutting down")

    def _clear_inbox(self) -> None:
        self.inbox.clear()
        self.inbox_len = 0

    def cut(self) -> None:
        """The drain deadline passed: end the answer in progress with an error
        message, then close 1001."""
        if self.runner is not None and self.open:
            self._cancel_runner()
            try:
                self.session.on_cut(self)
            except Exception:
                log.exception("websocket on_cut failed")
        self.close(CloseReason.GOING_AWAY, "server shutting down")

    def abort(self) -> None:
        if not self.closed:
            self.transport.abort()
