"""The server side of one HTTP/1.x connection, sans-IO: which request is
answered when, with what framing, whether the connection stays open, when
"100 Continue" goes out, how it closes, and when each timeout is due.

Bytes and the current time go in, requests and bytes come out; the caller
(worker/connection.py) does the socket I/O, runs the handlers and counts. No
clock is read here: every event carries `now`, so tests drive it with a fake
clock (tests/test_h1conn.py).

Three machines, as in h11 (whose `_state.py` is the model):

* the reader, `parser.phase` (protocol/h1.py): IDLE (between requests), HEAD,
  METHOD (an unknown method's line being judged), BODY, UPGRADE_BODY, DONE
  (nothing more is parsed: after an error, an Upgrade or CONNECT);
* the exchange, `exchange` (our side of the request being answered): IDLE
  (none taken, or answered at once), WAITING (an async handler runs: the
  request_timeout runs), STREAMING (a streamed answer's head went out), and
  CANCELLING (the server abandons the answer: shutdown cut or timeout);
* the connection, `state`: OPEN (keep-alive), DRAINING (the worker stops:
  the answer that leaves no request waiting says Connection: close, so no
  request the client already sent is lost; an idle connection closes at its
  timeout, never under a client that may be sending), CLOSING (the next or
  current answer is the last: a refusal, a timeout, an answer that failed),
  MUST_CLOSE (the last answer went out: close now), LINGERING (closed for
  writing, input read and dropped until `linger_until`), SWITCHED (another
  protocol owns the socket), CLOSED.

Requests are answered strictly in order. `receive` hands back the requests a
read completed when nothing is in flight; otherwise they wait in `queue`
(bounded: reading pauses over `max_pipeline` requests or `max_body_bytes` of
bodies, see `should_read`) and `next_request` releases them one at a time.
After `receive` or an answer, `attention` says the caller must run `after()`
(queued work, a 100 Continue, a refusal, a pending Upgrade).

The per-request path is kept to a few attribute stores: `receive` and
`respond` are one call each and allocate nothing beyond the head.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum
from typing import Any, Generic

from . import serialize as ser
from .h1 import (
    PHASE_BODY,
    PHASE_HEAD,
    PHASE_IDLE,
    PHASE_METHOD,
    PHASE_UPGRADE_BODY,
    H1Parser,
    HttpError,
    R,
    RequestFactory,
)
from .settings import ConnectionSettings

INF = float("inf")


class Conn(IntEnum):
    """The connection's state (ordered: a later state never goes back)."""

    OPEN = 0
    DRAINING = 1
    CLOSING = 2
    MUST_CLOSE = 3
    LINGERING = 4
    SWITCHED = 5
    CLOSED = 6


class Exchange(IntEnum):
    """Our side of the request being answered."""

    IDLE = 0
    WAITING = 1
    STREAMING = 2
    CANCELLING = 3


class Due(IntEnum):
    """What `check(now)` asks of the caller."""

    NOTHING = 0
    TIMEOUT = 1     # answer 408 (shaped by partial_request()) and close: head/body too slow
    CLOSE = 2       # close quietly (an idle keep-alive; the linger ended); abort unsent output
    ABORT = 3       # our output was left unread for send_timeout: abort
    PING = 4        # a silent stream: write frame(its idle ping), then pinged(now)
    EXPIRE = 5      # the answer (or a stream's next piece) is later than request_timeout
    STALL = 6       # a streamed request body stopped coming (protocol/h1stream.py): stall()


class Next(IntEnum):
    """What `after()` asks of the caller once nothing more can be answered now."""

    NOTHING = 0
    REFUSE = 1      # answer take_refusal() (it closes the connection)
    CLOSE = 2       # close (start the lingering close)
    CONTINUE = 3    # write ser.CONTINUE: the client may send the body


class Cancel(IntEnum):
    """Why the server abandons an answer in flight."""

    NONE = 0
    CUT = 1         # the worker's drain deadline: a stream ends with its abort event
    EXPIRED = 2     # request_timeout: 504 before any byte; a stream is closed mid-body


OPEN, DRAINING, CLOSING = Conn.OPEN, Conn.DRAINING, Conn.CLOSING
MUST_CLOSE, LINGERING = Conn.MUST_CLOSE, Conn.LINGERING
SWITCHED, CLOSED = Conn.SWITCHED, Conn.CLOSED
X_IDLE, WAITING, STREAMING, CANCELLING = (Exchange.IDLE, Exchange.WAITING, Exchange.STREAMING,
                                          Exchange.CANCELLING)
_NO_REQUESTS: list[Any] = []  # returned when a read completes nothing (never mutated)
# no body, no Content-Length (RFC 9110 6.4.1, 8.6); a 1xx is refused as an answer
_BODYLESS = frozenset([*range(100, 200), 204, 304])
_response_head, _bodyless_head, _stream_head = ser.response_head, ser.bodyless_head, ser.stream_head
_HEADS = ser.HEADS


class H1Connection(Generic[R]):
    __slots__ = ("settings", "parser", "state", "exchange", "queue", "queued_bytes", "refusal",
                 "fresh", "eof", "write_paused", "stalled_since", "idle_since", "attention",
                 "current", "taken_at", "piece_at", "pinged_at", "ping_after", "keep",
                 "chunked", "body_ok", "linger_until", "cancel_reason")

    def __init__(self, settings: ConnectionSettings, client: str,
                 make_request: RequestFactory[R], now: float) -> None:
        self.settings = settings
        self.parser: H1Parser[R] = H1Parser(client, settings.max_header_bytes,
                                            settings.max_body_bytes, make_request)
        self.state = OPEN
        self.exchange = X_IDLE
        self.queue: deque[tuple[R, float]] = deque()  # (request, when it arrived)
        self.queued_bytes = 0          # the bodies of the requests in `queue`
        self.refusal: HttpError[R] | None = None  # to answer once the queue is answered
        self.fresh = True              # no request yet: header_timeout applies to the wait
        self.eof = False               # the client half-closed its side
        self.write_paused = False      # unsent output is over the bound (the transport says)
        self.stalled_since = 0.0
        self.idle_since = now          # the connection's start, or the end of the last answer
        self.attention = False         # the caller must run after()
        self.current: R | None = None  # the request of a WAITING or STREAMING exchange
        self.taken_at = 0.0            # when the WAITING request was taken
        self.piece_at = 0.0            # the stream's last piece (the caller stores it)
        self.pinged_at = 0.0
        self.ping_after = 0.0          # a silent stream is pinged after this (0: never)
        self.keep = False              # the stream in flight leaves the connection open
        self.chunked = False           # the stream in flight is chunked (else close-delimited)
        self.body_ok = True            # the last head allows a body (not HEAD, 204, 304)
        self.linger_until = 0.0
        self.cancel_reason = Cancel.NONE

    # ------------------------------------------------------------ input
    def receive(self, data: bytes, now: float) -> list[R]:
        """Bytes read. Returns the requests to answer now, in order (answer each,
        and hand back with `defer` those after one that could not be answered at
        once: see can_take). Input that must be refused is answered once the
        requests before it are (`after` says REFUSE)."""
        if self.state >= LINGERING:
            return _NO_REQUESTS  # the last answer went out: input is dropped
        parser = self.parser
        try:
            reqs = parser.feed(data, now)
        except HttpError as e:
            self._refuse(e, now)
            return _NO_REQUESTS
        if reqs:
            self.fresh = False
            if self.exchange or self.queue or self.write_paused or self.state:
                # something is in flight, or waits, or the client does not read, or
                # the connection is not plain keep-alive: they are answered one by
                # one (next_request), so each answer knows what still waits
                self.defer(reqs, now)
                return _NO_REQUESTS
        if parser.continue_pending or parser.upgrade is not None:
            self.attention = True
        return reqs

    def defer(self, reqs: list[R], now: float) -> None:
        """Requests that must wait for the ones before them."""
        queue = self.queue
        for r in reqs:
            queue.append((r, now))
            self.queued_bytes += len(r.body)
        self.attention = True

    def _refuse(self, e: HttpError[R], now: float) -> None:
        """Unparseable input: the requests before it are answered (in order), then
        the refusal, then the connection closes. The parser takes no more input."""
        self.refusal = e
        if e.requests:
            self.fresh = False
            self.defer(e.requests, now)
        self.attention = True

    def eof_received(self) -> bool:
        """The client half-closed. True: keep the transport open to answer what
        it sent; False: close now (nothing is in flight)."""
        self.eof = True
        return bool(self.exchange or self.queue) and self.state < LINGERING

    def pause_writing(self, now: float) -> None:
        self.write_paused = True
        self.stalled_since = now

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue and not self.exchange:
            self.attention = True  # answers held back while the client was not reading

    def shutdown(self) -> None:
        """The worker drains: the answer that leaves nothing waiting is the last
        (Connection: close). An idle connection is not closed here: its client may
        be sending a request right now; it closes at its timeout (check), as it
        would anyway."""
        if self.state is OPEN:
            self.state = DRAINING

    def close_after_answer(self) -> None:
        """The answer being made is the connection's last (it failed half-way)."""
        if self.state < CLOSING:
            self.state = CLOSING

    def lost(self) -> None:
        self.state = CLOSED
        self.queue.clear()
        self.queued_bytes = 0

    # ------------------------------------------------------------ what to answer
    def can_take(self) -> bool:
        """A request may be answered now: nothing in flight, the connection may
        still answer, and the client reads what we write."""
        return not self.exchange and self.state <= CLOSING and not self.write_paused

    def next_request(self) -> tuple[R, float] | None:
        """The next queued request (and when it arrived) if it may be answered now."""
        if self.queue and not self.exchange and self.state <= CLOSING and not self.write_paused:
            item = self.queue.popleft()
            self.queued_bytes -= len(item[0].body)
            return item
        return None

    def after(self) -> Next:
        """Once nothing more can be answered now: a refusal due, a close, or the
        100 Continue that lets the next body come."""
        self.attention = False
        if self.exchange or self.queue or self.state >= LINGERING:
            return Next.NOTHING
        if self.refusal is not None:
            return Next.REFUSE
        if self.state is MUST_CLOSE or self.eof:
            return Next.CLOSE
        parser = self.parser
        if parser.continue_pending:
            parser.continue_pending = False
            return Next.CONTINUE
        return Next.NOTHING

    def take_refusal(self) -> HttpError[R]:
        """The refusal to answer now (after() said REFUSE); its answer closes."""
        e = self.refusal
        assert e is not None
        self.refusal = None
        self.state = CLOSING
        return e

    def queue_full(self) -> bool:
        """Too much waits to be answered: read no more until it drains. Bodies count
        in bytes, so 33 queued 8 MB uploads are not held at once."""
        return len(self.queue) > self.settings.max_pipeline or \
            self.queued_bytes > self.settings.max_body_bytes

    def should_read(self) -> bool:
        """Whether the transport should be read now."""
        st = self.state
        if st is LINGERING:
            return True  # read and drop, so a client still sending gets our answer, not a reset
        if st > LINGERING or self.write_paused or self.parser.upgrade is not None:
            return False  # (what follows an Upgrade waits for whoever takes it)
        return not self.queue_full()

    # ------------------------------------------------------------ answers
    def wait(self, req: R, now: float) -> None:
        """The request's handler answers later (async): the request_timeout runs."""
        self.exchange = WAITING
        self.current = req
        self.taken_at = now

    def respond(self, req: R | None, status: int, content_type: str,
                headers: dict[str, str] | None, trusted: bytes, length: int,
                now: float) -> bytes:
        """The head of a whole answer of `length` body bytes (req None: a refusal
        before any request was parsed). Send the body only if `body_ok`. Raises
        ValueError for a status or header no response may carry."""
        if req is None:
            keep = http10 = False
            self.body_ok = True
        else:
            # (OPEN is 0; draining, an answer keeps the connection while requests wait)
            keep = req.keep_alive and (not self.state or (
                self.state is DRAINING and bool(self.queue)))
            http10 = req.version == "1.0"
            self.body_ok = req.method != "HEAD"
        head: bytes | None
        if status in _BODYLESS:
            if status < 200:  # an interim status cannot end an exchange: the client would wait
                raise ValueError(f"status {status} is not a final answer")
            head = _bodyless_head(status, headers, keep, http10, trusted)
            self.body_ok = False
        else:
            head = None if headers or trusted else _HEADS.get(
                (status, content_type, length, keep, http10))  # (most answers repeat)
            if head is None:
                head = _response_head(status, content_type, headers, length, keep, http10,
                                      trusted)
        self.exchange = X_IDLE
        self.idle_since = now
        if not keep:
            self.state = MUST_CLOSE
        return head

    def start_stream(self, req: R, status: int, content_type: str,
                     headers: dict[str, str] | None, trusted: bytes, ping_after: float,
                     now: float) -> bytes:
        """The head of a streamed answer: chunked on HTTP/1.1, delimited by the
        close on HTTP/1.0; a 204 or 304 carries no body, a HEAD only the head.
        Frame each piece with ser.chunk when `chunked`; store `piece_at` as
        pieces go out; end with end_stream()."""
        if status < 200:
            raise ValueError(f"status {status} is not a final answer")
        http10 = req.version == "1.0"
        bodyless = status == 204 or status == 304
        self.body_ok = not bodyless and req.method != "HEAD"
        keep = req.keep_alive and (bodyless or not http10) and (
            self.state is OPEN or (self.state is DRAINING and bool(self.queue)))
        if bodyless:
            head = _bodyless_head(status, headers, keep, http10, trusted)
        else:
            head = _stream_head(status, content_type, headers, keep, http10, trusted)
        self.keep = keep
        self.chunked = self.body_ok and not http10
        self.exchange = STREAMING
        self.current = req
        self.piece_at = self.pinged_at = now
        self.ping_after = ping_after
        return head

    def frame(self, data: bytes) -> bytes:
        """A piece of the stream in flight, framed (a ping too)."""
        return ser.chunk(data) if self.chunked else data

    def pinged(self, now: float) -> None:
        self.pinged_at = now

    def end_stream(self, now: float) -> bytes:
        """The stream's last bytes (the last chunk, or nothing)."""
        tail = ser.LAST_CHUNK if self.chunked else b""
        self._stream_done(now)
        return tail

    def cut_stream(self, abort_chunk: bytes | None, now: float) -> bytes:
        """The stream is cut (shutdown deadline): its abort event and a proper end
        of body; the connection closes after."""
        last = abort_chunk if abort_chunk and self.body_ok else b""
        if self.chunked:
            data = (ser.chunk(last) if last else b"") + ser.LAST_CHUNK
        else:
            data = last
        self.keep = False
        self._stream_done(now)
        return data

    def abandon_stream(self, now: float) -> None:
        """The stream stays unfinished (its source went silent for request_timeout):
        no last chunk, so the client sees an incomplete body; the connection closes."""
        self.keep = False
        self._stream_done(now)

    def _stream_done(self, now: float) -> None:
        self.exchange = X_IDLE
        self.current = None
        self.ping_after = 0.0
        self.idle_since = now
        if not self.keep:
            self.state = MUST_CLOSE

    def cancel(self, reason: Cancel) -> None:
        """The server abandons the answer in flight (its task is being cancelled)."""
        self.exchange = CANCELLING
        self.cancel_reason = reason

    def take_cancel(self) -> Cancel:
        """Why the answer's task was cancelled (NONE: not by the server, so the
        client went away or the worker stops); the reason is used up. An expired
        async answer then goes out as a 504 through respond(), like any answer."""
        reason = self.cancel_reason
        self.cancel_reason = Cancel.NONE
        return reason

    def take_upgrade(self, req: R) -> bytes | None:
        """Switch protocols for `req` (the handler accepted its Upgrade): the bytes
        that followed it, or None if it did not ask to switch (or had a body)."""
        taken = self.parser.take_upgrade()
        if taken is None or taken[0] is not req or self.state >= MUST_CLOSE:
            return None
        self.state = SWITCHED
        self.exchange = X_IDLE
        self.queue.clear()
        self.queued_bytes = 0
        return taken[1]

    def partial_request(self) -> R | None:
        """The request in progress as far as it came, to shape a 408."""
        return self.parser.partial_request()

    # ------------------------------------------------------------ closing
    def start_close(self, now: float) -> bool:
        """Begin closing after the last answer: True to linger (shut our side
        and read and drop input until `linger_until`, so a client still sending
        gets our answer instead of a reset), False to close at once (the client
        has finished sending)."""
        self.state = LINGERING
        self.linger_until = now + self.settings.linger
        self.queue.clear()
        self.queued_bytes = 0
        return not self.eof

    # ------------------------------------------------------------ timeouts
    def deadline(self) -> tuple[float, Due]:
        """When the next timeout is due and what it asks (INF, NOTHING: none)."""
        st = self.state
        s = self.settings
        if st is LINGERING:
            return self.linger_until, Due.CLOSE
        if st >= MUST_CLOSE:
            return INF, Due.NOTHING
        if self.write_paused:
            # the client leaves our output unread: nothing else can happen here, and
            # a close would wait for a flush that never comes
            return self.stalled_since + s.send_timeout, Due.ABORT
        ex = self.exchange
        if ex is WAITING:
            return self.taken_at + s.request_timeout, Due.EXPIRE
        if ex is STREAMING:
            expire = self.piece_at + s.request_timeout
            if self.ping_after:
                ping = max(self.piece_at, self.pinged_at) + self.ping_after
                if ping < expire:
                    return ping, Due.PING
            return expire, Due.EXPIRE
        if ex or self.queue:
            return INF, Due.NOTHING  # (CANCELLING: the caller finishes it at once)
        parser = self.parser
        phase = parser.phase
        if phase == PHASE_IDLE:
            if self.fresh:  # a new connection that has sent nothing: 408
                return self.idle_since + s.header_timeout, Due.TIMEOUT
            return self.idle_since + s.keepalive_timeout, Due.CLOSE  # quietly, as nginx
        if phase == PHASE_HEAD or phase == PHASE_METHOD:
            # from the connection's start or the last answer, not the head's first
            # byte: silence then a trickle gets no second header_timeout
            return self.idle_since + s.header_timeout, Due.TIMEOUT
        if phase == PHASE_BODY or phase == PHASE_UPGRADE_BODY:
            return parser.body_started + s.body_timeout, Due.TIMEOUT
        return INF, Due.NOTHING  # PHASE_DONE: an answer or a refusal closes it

    def check(self, now: float) -> Due:
        """What is due at `now` (the worker's sweep calls this twice a second)."""
        when, due = self.deadline()
        return due if now > when else Due.NOTHING

    def timed_out(self) -> R | None:
        """A TIMEOUT is being answered (408, then close): the request as far as
        it came, for the answer's shape."""
        self.close_after_answer()
        return self.parser.partial_request()
