"""One client connection: the socket glue around the sans-IO connection state
machine (protocol/h1conn.py).

The state machine decides what is answered when, the framing, keep-alive,
100-continue, the refusal after queued requests, the lingering close and
every timeout. This module turns the transport's callbacks into its events,
runs the handlers (App.handle; async ones in a task), writes the bytes it
returns, keeps the flow control (reading paused while the client does not
read our output or too much waits; a stream waits in `drain`), and counts
requests, responses, bytes and latency in the worker's stats slot.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from bisect import bisect_right
from time import monotonic
from typing import Any

from ..errors import error_response
from ..messages import Request, Response, StreamedRequest, StreamingResponse, WebSocketUpgrade
from ..protocol import serialize as ser
from ..protocol.h1conn import Cancel, Due, H1Connection, Next
from ..protocol.h1conn import Conn as _Conn
from ..protocol.h1stream import BodyError, BodyReader, StreamingConnection
from ..protocol.settings import ConnectionSettings
from ..stats import layout as L
from . import websocket
from .base import ClientConnection
from .host import ConnectionHost, RouteCells

log = logging.getLogger("neurohttp")

_BOUNDS = L.BUCKET_BOUNDS_US
_S_REQUESTS, _S_STATUS = L.S_REQUESTS, L.S_STATUS
_S_BYTES_IN, _S_BYTES_OUT, _S_HIST = L.S_BYTES_IN, L.S_BYTES_OUT, L.S_HIST
_S_LAT_SUM, _S_LAT_MAX = L.S_LATENCY_SUM_US, L.S_LATENCY_MAX_US
_RW, _RB_CLASS = L.ROUTE_WORDS, L.RB_CLASS
_Response = Response
_Upgrade = WebSocketUpgrade
_MUST_CLOSE, _LINGERING = _Conn.MUST_CLOSE, _Conn.LINGERING
_NOTHING = Due.NOTHING
_chunk = ser.chunk


def busy_response() -> Response:
    """The answer of a full worker to a new connection."""
    return error_response(None, 503, "server busy, try again", headers={"Retry-After": "1"})


def account(slot: Any, meter: RouteCells, status: int, nbytes: int, t0: float, route: int,
            t1: float) -> None:
    """Count a response. Done before its last bytes are handed to the socket,
    so a client that has read it sees it in any later /stats."""
    us = int((t1 - t0) * 1e6)
    s = slot
    s[_S_STATUS + status // 100] += 1  # also the response count (the classes' sum)
    s[_S_BYTES_OUT] += nbytes
    s[_S_LAT_SUM] += us
    b = bisect_right(_BOUNDS, us)
    s[_S_HIST + b] += 1
    # this second's cell of the route (stats/window.py): the coarse bucket, and
    # the status class unless 2xx (derived: the bucket total minus the others)
    c = meter.cur + route * _RW
    s[c + (b >> 1)] += 1
    k = status // 100
    if k != 2:
        s[c + _RB_CLASS + k] += 1
    if us > s[_S_LAT_MAX]:
        s[_S_LAT_MAX] = us


def count_refusal(host: ConnectionHost, nbytes: int, t0: float) -> None:
    """Count a connection the acceptor answered 503 and closed at once, as the
    connection would count its own (worker/acceptor.py)."""
    s = host.slot
    s[L.S_CONNECTIONS] += 1
    s[_S_REQUESTS] += 1
    account(s, host.meter, 503, nbytes, t0, 0, monotonic())
    if host.access_log is not None:
        host.access_log.record(None, 503, nbytes, t0)


class HttpConnection(ClientConnection):
    __slots__ = ("settings", "host", "slot", "app", "routes", "meter", "access_log", "transport",
                 "sm", "read_paused", "task", "drain_waiter", "closed", "stream", "owed")
    sm: H1Connection[Request]  # made in connection_made (it needs the peer's address)

    def __init__(self, settings: ConnectionSettings, host: ConnectionHost) -> None:
        self.settings = settings
        self.host = host
        self.slot = host.slot
        self.app = host.app
        self.routes = host.app.route_index  # path or raw target -> the stats route index
        self.meter = host.meter
        self.access_log = host.access_log
        self.transport: Any = None
        self.read_paused = False
        self.task: asyncio.Task[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.stream: StreamingResponse | None = None  # the stream being sent
        self.owed = 0.0             # t0 of the async request in flight not yet counted answered

    def _output_paused(self) -> bool:
        return self.sm.write_paused

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        host = self.host
        s = self.slot
        s[L.S_CONNECTIONS] += 1
        s[L.S_ACTIVE_CONNECTIONS] += 1
        now = monotonic()
        peer = transport.get_extra_info("peername")
        client = peer[0] if peer else ""
        app = self.app
        max_upload = app.max_upload
        if max_upload:
            # a route streams its body: this connection parses for it (h1stream.py)
            sm = StreamingConnection(self.settings, client, StreamedRequest, now,
                                     app.upload_limit, max_upload)
            sm.parser.pulled = self._body_pulled
            self.sm = sm  # (a subclass, over StreamedRequest)
        else:
            self.sm = H1Connection(self.settings, client, Request, now)
        transport.set_write_buffer_limits(high=self.settings.write_buffer_bytes)
        if host.draining:
            # accepted while draining (it was queued on a socket that may be closing
            # for good): served, once, with Connection: close
            self.sm.shutdown()
        refusal = host.register(self, client)
        if refusal is not None:
            s[_S_REQUESTS] += 1  # counted with its answer: requests == responses
            self._send(None, refusal, now)

    def data_received(self, data: bytes) -> None:
        self.slot[_S_BYTES_IN] += len(data)
        sm = self.sm
        now = monotonic()
        reqs = sm.receive(data, now)
        if reqs:
            if len(reqs) == 1:
                self._handle(reqs[0], now)
            else:
                for i, r in enumerate(reqs):
                    self._handle(r, now)
                    # busy, closing, or the client is not reading (write paused):
                    # queue the rest of this read rather than buffer its answers
                    if not sm.can_take() and i + 1 < len(reqs):
                        sm.defer(reqs[i + 1:], now)
                        break
        if sm.attention:
            self._pump()

    def eof_received(self) -> bool | None:
        # The client half-closed: answer what it sent, then close (returning None
        # closes now when nothing is in flight).
        return True if self.sm.eof_received() else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._forget():
            return
        self.sm.lost()
        if self.owed and self.stream is None:
            # the client left before its answer began (a stream counts its own end)
            self._settle(self.sm.current, 499, 0, self.owed)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        self.sm.pause_writing(monotonic())
        self._pause_reading()

    def resume_writing(self) -> None:
        sm = self.sm
        sm.resume_writing()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if sm.attention:
            self._pump()  # answers held back while the client was not reading
        else:
            self._sync_reading()

    def _body_pulled(self, reader: BodyReader) -> None:
        """The handler takes (or waits for) a piece of its streamed body: send the
        100 Continue its client may wait for, and read on below the bound."""
        if self.closed:
            return
        sm: StreamingConnection[StreamedRequest] = self.sm  # type: ignore[assignment]
        reader.progress_at = monotonic()
        if sm.continue_due(reader):
            self.transport.write(ser.CONTINUE)
        if self.read_paused and sm.should_read():
            self._resume_reading()

    # ------------------------------------------------------------ dispatch
    def _pump(self) -> None:
        """Answer what may be answered now, then do what the state machine says."""
        if self.closed:
            return  # (switched to WebSocket)
        sm = self.sm
        item = sm.next_request()
        while item is not None:
            self._handle(item[0], item[1])
            if self.closed:
                return
            item = sm.next_request()
        nxt = sm.after()
        if nxt is Next.REFUSE:
            e = sm.take_refusal()
            s = self.slot
            s[L.S_ERRORS_PARSE] += 1
            s[_S_REQUESTS] += 1  # counted when answered: requests == responses
            self._send(None, error_response(e.request, e.status, e.message), monotonic())
        elif nxt is Next.CLOSE:
            self._close()
        elif nxt is Next.CONTINUE:
            self.transport.write(ser.CONTINUE)
        self._sync_reading()

    def _sync_reading(self) -> None:
        if self.sm.should_read():
            self._resume_reading()
        else:
            self._pause_reading()

    def _handle(self, req: Request, t0: float) -> None:
        # Requests are counted when taken for an answer, not when parsed: one left in
        # the queue when the client goes (or after a closing answer) is never counted,
        # so every counted request gets exactly one counted response.
        self.slot[_S_REQUESTS] += 1
        try:
            result = self.app.handle(req)
        except Exception:  # App.handle catches handler errors; this is a bug guard
            log.exception("dispatch failed")
            result = error_response(req, 500, "internal server error")
        if type(result) is _Response:
            self._send(req, result, t0)
        elif type(result) is _Upgrade:
            self._upgrade(req, result, t0)
        else:
            self.sm.wait(req, monotonic())
            self.owed = t0
            self.task = self.host.loop.create_task(self._run_async(req, result, t0))

    async def _run_async(self, req: Request, result: Any, t0: float) -> None:
        sm = self.sm
        try:
            if inspect.isawaitable(result):
                try:
                    result = await result
                except asyncio.CancelledError:
                    if sm.take_cancel() is not Cancel.EXPIRED or self.closed:
                        raise
                    # request_timeout: the handler is abandoned, the client told so
                    log.warning("%s %s not answered within request_timeout (%g s): 504",
                                req.method, req.path, self.settings.request_timeout)
                    result = error_response(req, 504, "the server did not produce an answer "
                                            "in time (request_timeout)")
                except BodyError as e:
                    # its streamed body could not be read (too slow, too large, bad
                    # framing, the client's EOF): that is the answer, and the last
                    result = error_response(req, e.status, e.message)
                except Exception:
                    log.exception("handler for %s %s failed", req.method, req.path)
                    result = error_response(req, 500, "internal server error")
            if isinstance(result, StreamingResponse):
                await self._stream(req, result, t0)
            elif isinstance(result, WebSocketUpgrade):
                self.owed = 0.0
                self._upgrade(req, result, t0)
                return
            else:
                if not isinstance(result, Response):
                    log.error("handler for %s %s returned %r", req.method, req.path,
                              type(result))
                    result = error_response(req, 500, "internal server error")
                self.owed = 0.0
                self._send(req, result, t0)
        except asyncio.CancelledError:
            return  # the client went away (counted in connection_lost), or the worker stops
        except Exception:
            log.exception("response for %s %s failed", req.method, req.path)
            if self.owed:
                self._settle(req, 500, 0, t0)
            self._close()
            return
        finally:
            self.task = None
        if not self.closed:
            self._pump()

    def _upgrade(self, req: Request, up: WebSocketUpgrade, t0: float) -> None:
        """Answer 101 and hand the socket to a WebSocket connection."""
        leftover = None if self.closed else self.sm.take_upgrade(req)
        if leftover is None:
            # the handler said yes but the request did not ask to switch (or had a body)
            self._send(req, error_response(req, 400, "this request cannot switch protocols"), t0)
            return
        head = ser.switch_head(up.accept, up.headers, up.trusted_headers)
        self._account(101, len(head), t0, self._route(req))
        self.transport.write(head)
        # From here the WebSocket object owns the socket, its callbacks and its
        # place in the worker's connections (and the active_connections gauge).
        self.closed = True
        ws = websocket.WebSocketConnection(self.settings, self.host, self.transport, req, up)
        self.host.handover(self, ws)
        ws.start(leftover)

    # ------------------------------------------------------------ responses
    def _send(self, req: Request | None, resp: Response, t0: float) -> None:
        """Write a complete response (req None: an error before any request parsed)."""
        sm = self.sm
        if req is None:
            route = 0
        else:
            r = self.routes.get(req.target)  # the raw target: no path decoding
            route = self.routes.get(req.path, 0) if r is None else r
        body = resp.body
        status = resp.status
        t1 = monotonic()
        try:
            head = sm.respond(req, status, resp.content_type, resp.headers, resp.trusted_headers,
                              len(body), t1)
        except ValueError as e:  # a handler set an invalid header or status
            log.error("bad response from handler for %r: %s", req, e)
            resp = error_response(req, 500, "internal server error")
            body, status = resp.body, 500
            sm.close_after_answer()
            head = sm.respond(req, 500, resp.content_type, None, b"", len(body), t1)
        if not sm.body_ok:
            body = b""
        account(self.slot, self.meter, status, len(head) + len(body), t0, route, t1)
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        if self.access_log is not None:  # the only cost of the access log when it is off
            self.access_log.record(req, status, len(head) + len(body), t0)
        if sm.state is _MUST_CLOSE:
            self._close()

    def _route(self, req: Request) -> int:
        """The stats index of the request's route (0: "other"); _send inlines this."""
        route = self.routes.get(req.target)
        return self.routes.get(req.path, 0) if route is None else route

    def _settle(self, req: Request | None, status: int, nbytes: int, t0: float) -> None:
        """Count and log the end of an async answer that did not end normally; its
        bytes were counted as they were written."""
        self.owed = 0.0
        self._account(status, 0, t0, self._route(req) if req is not None else 0)
        if self.access_log is not None:
            self.access_log.record(req, status, nbytes, t0)

    def _account(self, status: int, nbytes: int, t0: float, route: int = 0) -> None:
        account(self.slot, self.meter, status, nbytes, t0, route, monotonic())

    async def _stream(self, req: Request, resp: StreamingResponse, t0: float) -> None:
        """Send a streamed body piece by piece, waiting whenever the client reads slowly."""
        sm = self.sm
        try:
            head = sm.start_stream(req, resp.status, resp.content_type, resp.headers,
                                   resp.trusted_headers,
                                   resp.idle_after if resp.idle_ping else 0.0, monotonic())
        except ValueError as e:  # a handler set an invalid header or status
            log.error("bad stream from handler for %r: %s", req, e)
            aclose = getattr(resp.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            sm.close_after_answer()
            self.owed = 0.0
            self._send(req, error_response(req, 500, "internal server error"), t0)
            return
        route = self._route(req)
        s = self.slot
        s[L.S_STREAMS] += 1
        s[L.S_STREAMS_ACTIVE] += 1
        cancelled = True
        sent = 0
        self.stream = resp
        transport = self.transport
        try:
            s[_S_BYTES_OUT] += len(head)
            transport.write(head)
            sent = len(head)
            if sm.body_ok:
                chunked = sm.chunked
                async for piece in resp.chunks:
                    if not piece:
                        continue
                    data = _chunk(piece) if chunked else piece
                    s[_S_BYTES_OUT] += len(data)
                    sent += len(data)
                    sm.piece_at = monotonic()  # (the ping and request_timeout clocks)
                    transport.write(data)
                    if sm.write_paused:
                        await self.drain()
            cancelled = False
            t1 = monotonic()
            tail = sm.end_stream(t1)
            self.owed = 0.0
            account(s, self.meter, resp.status, len(tail), t0, route, t1)
            if tail:
                transport.write(tail)
            if self.access_log is not None:
                self.access_log.record(req, resp.status, sent + len(tail), t0)
        except asyncio.CancelledError:
            reason = sm.take_cancel()
            if reason is Cancel.CUT and not self.closed:
                # shutdown deadline: a last error event, a proper end of body, close
                data = sm.cut_stream(resp.abort_chunk, monotonic())
                self.owed = 0.0
                self._account(resp.status, len(data), t0, route)
                transport.write(data)
                transport.close()
                if self.access_log is not None:
                    self.access_log.record(req, resp.status, sent + len(data), t0)
            elif reason is Cancel.EXPIRED and not self.closed:
                # its source was silent for request_timeout: no last chunk, so the
                # client sees an incomplete body (as nginx ends a timed-out proxy)
                log.warning("%s %s: the stream sent nothing for request_timeout (%g s): "
                            "closed unfinished", req.method, req.path,
                            self.settings.request_timeout)
                sm.abandon_stream(monotonic())
                self._settle(req, resp.status, sent, t0)
                self._close()
            elif self.owed:
                # the client went away mid-stream: nginx's 499, counted as a response
                # (4xx) so that requests == responses once it is gone
                self._settle(req, 499, sent, t0)
            raise
        except Exception:
            if self.owed:  # a body that failed half-way: its status went out with the head
                self._settle(req, resp.status, sent, t0)
            raise
        finally:
            self.stream = None
            s[L.S_STREAMS_ACTIVE] -= 1
            if cancelled:
                s[L.S_STREAMS_CANCELLED] += 1
            if resp.on_close is not None:
                try:
                    resp.on_close(cancelled)
                except Exception:
                    log.exception("stream on_close failed")
            if cancelled or not sm.body_ok:
                # (a body never sent, for HEAD, 204 or 304: its source is released too)
                aclose = getattr(resp.chunks, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        pass
        if sm.state is _MUST_CLOSE:
            self._close()

    # ------------------------------------------------------------ closing
    def _close(self) -> None:
        """Close after the output drains, reading and dropping input meanwhile, so a
        client still sending (a refused body, pipelined requests) gets our answer
        instead of a reset."""
        sm = self.sm
        if self.closed or sm.state >= _LINGERING:
            return
        t = self.transport
        if not sm.start_close(monotonic()):
            t.close()  # the client has finished sending: nothing to drain
            return
        self._resume_reading()
        try:
            if t.can_write_eof():
                t.write_eof()
            else:
                t.close()
        except (OSError, RuntimeError):
            t.close()

    def abort(self) -> None:
        if not self.closed:
            self.transport.abort()

    def cut(self) -> None:
        """The shutdown deadline passed: end a stream in flight with its final
        error event (see _stream); anything else is left for abort()."""
        if self.stream is not None and self.task is not None and not self.closed:
            self.sm.cancel(Cancel.CUT)
            self.task.cancel()

    def shutdown(self) -> None:
        """The worker drains: the next answer ends the connection (Connection:
        close). An idle one is left to its timeout (H1Connection.shutdown).
        Called on every pass of the drain."""
        self.sm.shutdown()

    # ------------------------------------------------------------ timers (the worker's sweep)
    def check_timeouts(self, now: float) -> None:
        sm = self.sm
        due = sm.check(now)
        if due is _NOTHING:
            return
        if due is Due.CLOSE:
            self._drop()  # idle keep-alive (quietly, as nginx does), or the linger ended
        elif due is Due.TIMEOUT:
            self._timeout_error()
        elif due is Due.ABORT:
            # The client leaves our output unread: nothing else can happen on this
            # connection, and close() would wait for a flush that never comes.
            self.transport.abort()
        elif due is Due.PING:
            # a silent stream: a comment keeps proxies and clients from timing it out
            st = self.stream
            if st is not None and st.idle_ping:
                data = sm.frame(st.idle_ping)
                self.slot[_S_BYTES_OUT] += len(data)
                self.transport.write(data)
            sm.pinged(now)
        elif due is Due.EXPIRE:
            if self.task is not None and not self.task.done():
                sm.cancel(Cancel.EXPIRED)
                self.task.cancel()
        elif due is Due.STALL:
            # a streamed body stopped coming: its handler gets a BodyError (408)
            self.sm.stall()  # type: ignore[attr-defined]  # (only a StreamingConnection says STALL)

    def _drop(self) -> None:
        """Close now; abort if output is still unsent (its reader is gone or stuck)."""
        t = self.transport
        if t.get_write_buffer_size():
            t.abort()
        else:
            t.close()

    def _timeout_error(self) -> None:
        """408 and close, in the shape of the request as far as it came (JSON on /v1/)."""
        self.slot[_S_REQUESTS] += 1
        self.slot[L.S_ERRORS_PARSE] += 1
        req = self.sm.timed_out()
        self._send(req, error_response(req, 408, "request not received in time"), monotonic())
