"""Memory per connection is bounded by what its requests may be (issue 9, item 1),
against a real 1-worker server: a body sent as millions of tiny chunks, pipelined
big bodies queued behind a slow answer, a WebSocket client flooding pings while it
never reads. Each is measured on the worker process (psutil, /proc) and on the
server's own byte counters."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import psutil
from server import wait_for
from streamtools import frame

MB = 1024 * 1024
WAIT = 30.0


class PeakRss:
    """The worker's peak RSS while the block runs: its kernel high-water mark
    (VmHWM, reset through clear_refs where allowed) and psutil samples."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()

    def _hwm(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
        except OSError:
            pass
        self.before = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)
        hwm = self._hwm()
        if hwm and hwm >= self.before:  # the reset worked: the kernel's figure is exact
            self.peak = max(self.peak, hwm)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def response_status(s: socket.socket, timeout: float = WAIT) -> int:
    s.settimeout(timeout)
    buf = b""
    while b"\r\n" not in buf:
        b = s.recv(65536)
        if not b:
            raise EOFError(f"closed without an answer: {buf!r}")
        buf += b
    return int(buf.split()[1])


def test_body_in_tiny_chunks_takes_memory_near_its_length(make_server):
    """8 MB sent as 4 million 2-byte chunks: the worker's RSS grows by a small
    multiple of the body (a list of pieces took ~540 MB)."""
    srv = make_server(workers=1)
    [pid] = srv.worker_pids()
    body_len = 8_000_000
    chunks = b"2\r\nab\r\n" * (body_len // 2)
    with PeakRss(pid) as rss, socket.create_connection((srv.host, srv.port), timeout=WAIT) as s:
        s.sendall(b"POST /nothing HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.sendall(chunks)
        s.sendall(b"0\r\n\r\n")
        assert response_status(s, 120) == 404  # the whole body was read, then routed
    print(f"RSS {rss.before >> 20} MiB, peak +{rss.growth / MB:.1f} MiB for an 8 MB body")
    assert rss.growth < 3 * body_len, f"worker grew {rss.growth >> 20} MiB for an 8 MB body"
    assert srv.worker_pids() == [pid]


def test_pipelined_bodies_behind_a_slow_answer_are_bounded_in_bytes(make_server):
    """A slow stream, then 60 pipelined 1 MB bodies from a client that does not
    read: the server stops reading once about one max_body_bytes is queued (by
    count alone it took 33 bodies per connection)."""
    max_body = MB
    srv = make_server(workers=1, config={
        "server": {"max_body_bytes": max_body},
        "models": {"slow": {"provider": "echo", "token_delay_ms": 1000, "repeat": True}}})
    [pid] = srv.worker_pids()
    slow = json.dumps({"prompt": "x", "stream": True, "model": "slow",
                       "max_tokens": 60}).encode()  # a minute: longer than the test
    big = b"{\"prompt\": \"" + b"x" * (max_body - 16) + b"\"}"
    post = (b"POST /nothing HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(big)) + big
    before = srv.stats()["bytes_in"]
    s = socket.create_connection((srv.host, srv.port), timeout=WAIT)
    try:
        with PeakRss(pid) as rss:
            s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                      % len(slow) + slow)
            s.setblocking(False)
            data = memoryview(post * 60)
            sent, stalled = 0, None
            deadline = time.monotonic() + 60
            while sent < len(data) and time.monotonic() < deadline:
                try:
                    sent += s.send(data[sent:sent + 4 * MB])
                    stalled = None
                except BlockingIOError:
                    now = time.monotonic()
                    stalled = stalled or now
                    if now - stalled > 2.0:
                        break
                    time.sleep(0.01)
            read = srv.stats()["bytes_in"] - before
        print(f"sent {sent >> 20} MiB, server read {read >> 20} MiB, "
              f"worker +{rss.growth / MB:.1f} MiB")
        assert sent < len(data), "the server read every pipelined body"
        # one body queued past the bound, one in the parser, one read, the answer in flight
        assert read < 8 * max_body, f"the server read {read >> 20} MiB ahead"
        assert rss.growth < 16 * max_body, f"worker grew {rss.growth >> 20} MiB"
    finally:
        s.close()
    wait_for(lambda: srv.stats()["streams_active"] == 0, WAIT, what="the stream to stop")
    assert srv.worker_pids() == [pid]


def test_ping_flood_from_a_client_that_never_reads_is_paused(make_server):
    """Pings whose pongs are never read: the server stops reading once its output is
    over write_buffer_bytes (pongs were buffered without bound, ~11 MB/s), then
    drops the client after send_timeout like any other reader that does not read."""
    srv = make_server(workers=1, config={"server": {"write_buffer_bytes": 65536,
                                                    "send_timeout": 6.0, "ws_ping_s": 0}})
    [pid] = srv.worker_pids()
    s = socket.socket()
    # a small receive buffer set before connecting (a window scaled to it): shrunk on an
    # open connection, a full window can starve the client's own sends of ACKs
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(WAIT)
    s.connect((srv.host, srv.port))
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    before = srv.stats()
    base_conns = before["active_connections"]
    ping = frame(0x9, b"p" * 125) * 512          # 64 KB of pings, as much pong output
    limit = 256 * MB
    sent, stalled, dropped = 0, None, False
    pending = memoryview(ping)
    try:
        with PeakRss(pid) as rss:
            s.setblocking(False)
            deadline = time.monotonic() + 60
            while sent < limit and time.monotonic() < deadline:
                try:
                    n = s.send(pending)
                    sent += n
                    pending = pending[n:] or memoryview(ping)  # frames stay whole
                    stalled = None
                except BlockingIOError:
                    now = time.monotonic()
                    stalled = stalled or now
                    if now - stalled > 2.0:
                        break
                    time.sleep(0.01)
                except (ConnectionResetError, BrokenPipeError):
                    dropped = True
                    break
            read = srv.stats()["bytes_in"] - before["bytes_in"]
        print(f"sent {sent >> 20} MiB of pings, server read {read >> 20} MiB, "
              f"worker +{rss.growth / MB:.1f} MiB")
        assert sent < limit, "the server kept reading pings it could not answer"
        # what the kernel buffers took before output passed write_buffer_bytes, then nothing
        assert read < 16 * MB, f"the server read {read >> 20} MiB of pings it could not answer"
        assert rss.growth < 48 * MB, f"worker grew {rss.growth >> 20} MiB"
        # the client never reads: dropped after send_timeout, nothing left behind
        wait_for(lambda: srv.stats()["active_connections"] < base_conns, WAIT,
                 what="the server to drop the client")
    finally:
        s.close()
    assert srv.worker_pids() == [pid], f"the worker died (client dropped: {dropped})"
