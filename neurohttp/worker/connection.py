"""One client connection: socket I/O around the sans-IO parser and serialiser.

Requests are answered strictly in order (pipelining): a synchronous handler's
response is written at once; an async handler or a stream makes the connection
busy and later requests wait in `queue`. Reading pauses while unsent output is
above the write-buffer bound or the queue is long (more than `max_pipeline`
requests, or more than `max_body_bytes` of their bodies), so a client cannot make
the worker buffer without limit. Timeouts are checked by the worker's sweep, not
by a timer per request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from bisect import bisect_right
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Any

from ..errors import error_response
from ..messages import Request, Response, StreamingResponse, WebSocketUpgrade
from ..protocol import serialize as ser
from ..protocol.h1 import (
    PHASE_BODY,
    PHASE_HEAD,
    PHASE_IDLE,
    PHASE_METHOD,
    PHASE_UPGRADE_BODY,
    H1Parser,
    HttpError,
)
from ..stats import layout as L
from . import websocket
from .base import ClientConnection

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("neurohttp")

_BOUNDS = L.BUCKET_BOUNDS_US
_S_REQUESTS, _S_STATUS = L.S_REQUESTS, L.S_STATUS
_S_BYTES_IN, _S_BYTES_OUT, _S_HIST = L.S_BYTES_IN, L.S_BYTES_OUT, L.S_HIST
_S_LAT_SUM, _S_LAT_MAX = L.S_LATENCY_SUM_US, L.S_LATENCY_MAX_US
_RW, _RB_CLASS = L.ROUTE_WORDS, L.RB_CLASS
_response_head = ser.response_head
_Response = Response
_Upgrade = WebSocketUpgrade
_NO_BODY = frozenset([*range(100, 200), 204, 304])

LINGER_SECONDS = 2.0  # after a closing response, read and drop input this long (see _close)


def busy_response() -> Response:
    """The answer of a full worker to a new connection."""
    return error_response(None, 503, "server busy, try again", headers={"Retry-After": "1"})


class HttpConnection(ClientConnection):
    __slots__ = ("w", "slot", "transport", "parser", "queue", "busy", "closing", "lingering",
                 "write_paused", "read_paused", "idle_since", "fresh", "task", "drain_waiter",
                 "closed", "current", "eof", "app", "error", "stalled_since", "stream",
                 "cutting", "meter", "queued_bytes", "owed", "said_close")
    parser: H1Parser  # made in connection_made (it needs the peer's address)

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.slot = worker.slot
        self.app = worker.app
        self.meter = worker.meter
        self.transport: Any = None
        self.queue: deque[tuple[Request, float]] = deque()
        self.queued_bytes = 0       # the bodies of the requests in `queue`
        self.busy = False           # an async handler or a stream owns the connection
        self.closing = False        # answer what is in flight with Connection: close, then close
        self.said_close = False     # an answer with Connection: close went out
        self.lingering = 0.0        # >0: output is done, input is dropped until this time
        self.write_paused = False
        self.read_paused = False
        self.idle_since = 0.0
        self.fresh = True           # no request yet: the header timeout applies to the wait
        self.task: asyncio.Task | None = None
        self.drain_waiter: asyncio.Future | None = None
        self.closed = False
        self.current: Request | None = None
        self.eof = False            # the client half-closed its side
        self.error: Response | None = None  # refusal to send once the queue is answered
        self.stalled_since = 0.0    # when unsent output last went over the bound
        self.stream: StreamingResponse | None = None  # the stream being sent
        self.cutting = False        # the server ends the stream (shutdown deadline)
        self.owed = 0.0             # t0 of the async request in flight not yet counted answered

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        w = self.w
        s = self.slot
        s[L.S_CONNECTIONS] += 1
        s[L.S_ACTIVE_CONNECTIONS] += 1
        w.connections.add(self)
        self.idle_since = monotonic()
        peer = transport.get_extra_info("peername")
        client = peer[0] if peer else ""
        self.parser = H1Parser(client, w.max_header_bytes, w.max_body_bytes)
        transport.set_write_buffer_limits(high=w.write_buffer_bytes)
        # A connection accepted while draining is served (see data_received): it
        # was queued on a socket that may be closing for good.
        n = len(w.connections)
        w.gate.opened(n)  # at the cap: the acceptors refuse from now on
        if n > w.max_connections:
            # accepted before the acceptors switched: refuse politely too
            s[_S_REQUESTS] += 1  # counted with its answer: requests == responses
            self._send(None, busy_response(), self.idle_since)
        elif w.firewall is not None:  # [firewall]: the peer's address rules, per-IP cap
            refusal = w.firewall.on_accept(client, transport)
            if refusal is not None:
                s[_S_REQUESTS] += 1
                self._send(None, refusal, self.idle_since)

    def data_received(self, data: bytes) -> None:
        self.slot[_S_BYTES_IN] += len(data)
        if self.lingering:
            return  # the last answer went out: nothing more will be answered
        now = monotonic()
        parser = self.parser
        try:
            reqs = parser.feed(data, now)
        except HttpError as e:
            self._protocol_error(e, now)
            return
        if reqs:
            if self.fresh:
                self.fresh = False
                if self.w.draining:  # accepted while draining: answer once, with close
                    self.closing = True
            if self.busy or self.queue:
                self._enqueue(reqs, now)
            elif len(reqs) == 1:
                self._handle(reqs[0], now)
            else:
                for i, r in enumerate(reqs):
                    self._handle(r, now)
                    # write_paused: the client is not reading; queue the rest of this
                    # read rather than buffer its answers (up to ~60x the input)
                    if self.busy or self.closing or self.write_paused:
                        self._enqueue(reqs[i + 1:], now)
                        break
            if parser.upgrade is not None and not (self.closed or self.lingering):
                self._pause_reading()  # what follows an Upgrade waits for whoever takes it
        if parser.continue_pending and not self.busy and not self.queue:
            parser.continue_pending = False
            self.transport.write(ser.CONTINUE)

    def _enqueue(self, reqs: list[Request], now: float) -> None:
        queue = self.queue
        for r in reqs:
            queue.append((r, now))
            self.queued_bytes += len(r.body)
        if self._queue_full():
            self._pause_reading()

    def _queue_full(self) -> bool:
        """Too much waits to be answered: read no more until it drains. Bodies count
        in bytes, so 33 queued 8 MB uploads are not held at once."""
        return len(self.queue) > self.w.max_pipeline or self.queued_bytes > self.w.max_body_bytes

    def eof_received(self) -> bool | None:
        # The client half-closed: answer what it sent, then close (returning None
        # closes now when nothing is in flight).
        self.eof = True
        if (self.busy or self.queue) and not self.lingering:
            return True  # _after_response closes once the queue is answered
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._forget():
            return
        self._drop_queue()
        if self.owed and self.stream is None:
            # the client left before its answer began (a stream counts its own end)
            self._settle(self.current, 499, 0, self.owed)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.w.on_connection_closed()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.stalled_since = monotonic()
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.queue and not self.busy:
            self._after_response()  # answers held back while the client was not reading
        elif not self._queue_full():
            self._resume_reading()

    # ------------------------------------------------------------ dispatch
    def _handle(self, req: Request, t0: float) -> None:
        # Requests are counted when taken for an answer, not when parsed: one left in
        # the queue when the client goes (or after a closing answer) is never counted,
        # so every counted request gets exactly one counted response.
        self.slot[_S_REQUESTS] += 1
        self.current = req
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
            self.busy = True
            self.owed = t0
            self.task = self.w.loop.create_task(self._run_async(req, result, t0))

    async def _run_async(self, req: Request, result: Any, t0: float) -> None:
        try:
            if inspect.isawaitable(result):
                try:
                    result = await result
                except asyncio.CancelledError:
                    raise
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
        self.busy = False
        self._after_response()

    def _after_response(self) -> None:
        """Continue with queued pipelined requests once the connection is free."""
        queue = self.queue
        while queue and not self.busy and not self.closing and not self.closed \
                and not self.write_paused:
            req, t0 = queue.popleft()
            self.queued_bytes -= len(req.body)
            self._handle(req, t0)
        if self.read_paused and not self.write_paused and not self._queue_full():
            self._resume_reading()
        if not self.busy and not queue and not self.closed:
            parser = self.parser
            if self.error is not None and not self.said_close:
                self.slot[_S_REQUESTS] += 1  # counted when answered: requests == responses
                self._send(None, self.error, monotonic())
            elif self.closing or self.eof:
                self._close()
            elif parser.continue_pending:
                parser.continue_pending = False
                self.transport.write(ser.CONTINUE)

    def _upgrade(self, req: Request, up: WebSocketUpgrade, t0: float) -> None:
        """Answer 101 and hand the socket to a WebSocket connection."""
        taken = self.parser.take_upgrade()
        if taken is None or taken[0] is not req or self.closed:
            # the handler said yes but the request did not ask to switch (or had a body)
            self._send(req, error_response(req, 400, "this request cannot switch protocols"), t0)
            return
        head = websocket.accept_head(up)
        self._account(101, len(head), t0, self._route(req))
        self.transport.write(head)
        # From here the WebSocket object owns the socket, its callbacks and its
        # place in worker.connections (and the active_connections gauge).
        self.closed = True
        self._drop_queue()
        self.w.connections.discard(self)
        websocket.WebSocketConnection(self.w, self.transport, req, up, taken[1])

    # ------------------------------------------------------------ responses
    def _send(self, req: Request | None, resp: Response, t0: float) -> None:
        """Write a complete response (req None: an error before any request parsed)."""
        if req is None:
            keep = http10 = head_only = False
            route = 0
        else:
            keep = req.keep_alive and not self.closing
            http10 = req.version == "1.0"
            head_only = req.method == "HEAD"
            r = self.app.route_index.get(req.target)  # the raw target: no path decoding
            route = self.app.route_index.get(req.path, 0) if r is None else r
        body = resp.body
        status = resp.status
        try:
            head = _response_head(status, resp.content_type, resp.headers, len(body), keep, http10)
        except ValueError as e:  # a handler set an invalid header or status
            log.error("bad response from handler for %r: %s", req, e)
            resp = error_response(req, 500, "internal server error")
            body, status, keep = resp.body, 500, False
            head = _response_head(status, resp.content_type, None, len(body), keep, http10)
        if head_only or status in _NO_BODY:
            body = b""
        self._account(status, len(head) + len(body), t0, route)
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        if self.w.access_log is not None:  # the only cost of the access log when it is off
            self.w.access_log.record(req, status, len(head) + len(body), t0)
        if not keep:
            self.closing = self.said_close = True
            if not self.busy:
                self._close()

    def _route(self, req: Request) -> int:
        """The stats index of the request's route (0: "other"); _send inlines this."""
        route = self.app.route_index.get(req.target)
        return self.app.route_index.get(req.path, 0) if route is None else route

    @classmethod
    def count_refusal(cls, worker: Worker, nbytes: int, t0: float) -> None:
        """Count a connection the acceptor answered 503 and closed at once, as the
        connection would count its own (worker/acceptor.py)."""
        c = cls(worker)
        s = c.slot
        s[L.S_CONNECTIONS] += 1
        s[_S_REQUESTS] += 1
        c._account(503, nbytes, t0)
        if worker.access_log is not None:
            worker.access_log.record(None, 503, nbytes, t0)

    def _settle(self, req: Request | None, status: int, nbytes: int, t0: float) -> None:
        """Count and log the end of an async answer that did not end normally; its
        bytes were counted as they were written."""
        self.owed = 0.0
        self._account(status, 0, t0, self._route(req) if req is not None else 0)
        if self.w.access_log is not None:
            self.w.access_log.record(req, status, nbytes, t0)

    def _account(self, status: int, nbytes: int, t0: float, route: int = 0) -> None:
        """Count a response. Done before its last bytes are handed to the socket,
        so a client that has read it sees it in any later /stats."""
        t1 = monotonic()
        us = int((t1 - t0) * 1e6)
        s = self.slot
        s[_S_STATUS + status // 100] += 1  # also the response count (the classes' sum)
        s[_S_BYTES_OUT] += nbytes
        s[_S_LAT_SUM] += us
        b = bisect_right(_BOUNDS, us)
        s[_S_HIST + b] += 1
        # this second's cell of the route (stats/window.py): the coarse bucket, and
        # the status class unless 2xx (derived: the bucket total minus the others)
        c = self.meter.cur + route * _RW
        s[c + (b >> 1)] += 1
        k = status // 100
        if k != 2:
            s[c + _RB_CLASS + k] += 1
        if us > s[_S_LAT_MAX]:
            s[_S_LAT_MAX] = us
        self.idle_since = t1

    async def _stream(self, req: Request, resp: StreamingResponse, t0: float) -> None:
        """Send a streamed body chunk by chunk, waiting whenever the client reads slowly."""
        http10 = req.version == "1.0"
        keep = req.keep_alive and not self.closing and not http10
        head_only = req.method == "HEAD"
        route = self._route(req)
        s = self.slot
        s[L.S_STREAMS] += 1
        s[L.S_STREAMS_ACTIVE] += 1
        cancelled = True
        sent = 0
        self.stream = resp
        try:
            head = ser.stream_head(resp.status, resp.content_type, resp.headers, keep, http10)
            s[_S_BYTES_OUT] += len(head)
            self.transport.write(head)
            sent = len(head)
            if not head_only:
                frame = (lambda b: b) if http10 else ser.chunk
                async for piece in resp.chunks:
                    if not piece:
                        continue
                    data = frame(piece)
                    s[_S_BYTES_OUT] += len(data)
                    sent += len(data)
                    self.idle_since = monotonic()  # for the idle ping (check_timeouts)
                    self.transport.write(data)
                    if self.write_paused:
                        await self.drain()
            cancelled = False
            tail = b"" if http10 or head_only else ser.LAST_CHUNK
            self.owed = 0.0
            self._account(resp.status, len(tail), t0, route)
            if tail:
                self.transport.write(tail)
            if self.w.access_log is not None:
                self.w.access_log.record(req, resp.status, sent + len(tail), t0)
        except asyncio.CancelledError:
            if self.cutting and not self.closed:
                # shutdown deadline: a last error event, a proper end of body, close
                last = resp.abort_chunk if resp.abort_chunk and not head_only else b""
                data = last if http10 else (ser.chunk(last) if last else b"") + ser.LAST_CHUNK
                self.owed = 0.0
                self._account(resp.status, len(data), t0, route)
                self.transport.write(data)
                self.transport.close()
                if self.w.access_log is not None:
                    self.w.access_log.record(req, resp.status, sent + len(data), t0)
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
            if cancelled:
                aclose = getattr(resp.chunks, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:
                        pass
        if not keep:
            self.closing = self.said_close = True

    # ------------------------------------------------------------ errors, closing
    def _protocol_error(self, e: HttpError, now: float) -> None:
        """Refuse unparseable input: answer the requests before it (in order), then
        the error, then close. The parser takes no more input after an error."""
        self.slot[L.S_ERRORS_PARSE] += 1
        self.error = error_response(e.request, e.status, e.message)
        if e.requests:
            self.fresh = False
            for r in e.requests:
                self.queue.append((r, now))
                self.queued_bytes += len(r.body)
        if not self.busy:
            self._after_response()

    def _drop_queue(self) -> None:
        self.queue.clear()
        self.queued_bytes = 0

    def _close(self) -> None:
        """Close after the output drains, reading and dropping input meanwhile, so a
        client still sending (a refused body, pipelined requests) gets our answer
        instead of a reset."""
        if self.closed or self.lingering:
            return
        self.closing = True
        self.lingering = monotonic() + LINGER_SECONDS
        t = self.transport
        if self.eof:
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
            self.cutting = True
            self.task.cancel()

    # ------------------------------------------------------------ timers (the worker's sweep)
    def check_timeouts(self, now: float) -> None:
        w = self.w
        if self.lingering:
            if now > self.lingering:
                self._drop()  # stays lingering: no timeout fires again on a closing connection
            return
        if self.write_paused:
            # The client leaves our output unread: nothing else can happen on this
            # connection, and close() would wait for a flush that never comes.
            if now - self.stalled_since > w.send_timeout:
                self.transport.abort()
            return
        if self.busy or self.queue:
            st = self.stream
            if (st is not None and st.idle_ping and st.idle_after
                    and now - self.idle_since > st.idle_after):
                # a silent stream: a comment keeps proxies and clients from timing it out
                cur = self.current
                data = st.idle_ping if cur is not None and cur.version == "1.0" else ser.chunk(
                    st.idle_ping)
                self.slot[_S_BYTES_OUT] += len(data)
                self.idle_since = now
                self.transport.write(data)
            return
        phase = self.parser.phase
        if phase == PHASE_IDLE:
            if self.fresh:
                if now - self.idle_since > w.header_timeout:
                    self._timeout_error()
            elif now - self.idle_since > w.keepalive_timeout:
                self._drop()  # idle keep-alive: close quietly, as nginx does
        elif phase == PHASE_HEAD or phase == PHASE_METHOD:
            # from the connection's start or the last response, not the head's first
            # byte: silence then a trickle gets no second header_timeout
            if now - self.idle_since > w.header_timeout:
                self._timeout_error()
        elif phase == PHASE_BODY or phase == PHASE_UPGRADE_BODY:
            if now - self.parser.body_started > w.body_timeout:
                self._timeout_error()

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
        req = self.parser.partial_request()
        self.closing = True
        self._send(req, error_response(req, 408, "request not received in time"), monotonic())

    def shutdown(self) -> None:
        """The worker drains: the next answer ends the connection (Connection: close).

        An idle connection is not closed now: its client may be sending a request
        at this moment, which a close would lose (no client can tell it from a
        request the server took). It is answered, with close, or closed by the
        sweep when it reaches keepalive_timeout (header_timeout for one that never
        sent a request), as it would be anyway; the drain's deadline,
        graceful_timeout, ends what is left. Called on every pass of the drain."""
        self.closing = True
