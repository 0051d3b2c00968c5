"""A small load generator for the no-request-lost tests: threads that each open
a fresh connection per request (or, with keep_alive=True, reuse one http.client
connection, as locust, load balancers and the OpenAI SDK do) and count what
happened to every request. Nothing is retried.

Outcomes:
- ok: a complete 200 response;
- refused: connect() refused (nothing listens: the server is stopped or the
  address removed). Not a lost request, the client knows it was not taken;
- failed: anything else: a connection the kernel accepted but that was reset,
  closed without an answer, timed out or answered wrongly. That is a lost
  request, and must never happen. On a reused keep-alive connection too: the
  server may close one only in a way no client can race (after answering with
  `Connection: close`, or once it has been idle for keepalive_timeout).
"""

from __future__ import annotations

import collections
import http.client
import socket
import threading
import time

REQUESTS = [
    b"GET /health HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n",
    b"POST /v1/chat HTTP/1.1\r\nHost: load\r\nConnection: close\r\n"
    b"Content-Length: 17\r\n\r\n{\"prompt\":\"load\"}",
]


def one_request(addr: tuple[str, int], payload: bytes, timeout: float = 15.0) -> str:
    """Send one request on a fresh connection; return "ok", "refused" or an error name."""
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(addr)
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            return f"connect: {type(e).__name__}"
        try:
            s.sendall(payload)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except OSError as e:
            return f"io: {type(e).__name__}"
        data = b"".join(chunks)
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return "no response" if not data else "truncated head"
        if not head.startswith(b"HTTP/1.1 200 "):
            return f"status {head[9:12].decode(errors='replace')}"
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length" and int(v) != len(body):
                return "truncated body"
        return "ok"
    finally:
        s.close()


class KeepAliveClient:
    """One http.client connection reused for every request, opened again only when
    the server closed it (after a `Connection: close` answer) or a request failed."""

    BODY = b'{"prompt":"load"}'

    def __init__(self, addr: tuple[str, int], timeout: float = 15.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def request(self, i: int) -> str:
        """Send request i; return "ok", "refused" or what went wrong (never retried)."""
        if self.conn is None or self.conn.sock is None:
            if self.conn is not None:
                self.conn.close()
            self.conn = http.client.HTTPConnection(*self.addr, timeout=self.timeout)
            try:
                self.conn.connect()
            except ConnectionRefusedError:
                self.conn = None
                return "refused"
            except OSError as e:
                self.conn = None
                return f"connect: {type(e).__name__}"
            self.connects += 1
        conn = self.conn
        try:
            if i % 2:
                conn.request("POST", "/v1/chat", body=self.BODY,
                             headers={"Content-Type": "application/json"})
            else:
                conn.request("GET", "/health")
            r = conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self.conn = None
            return f"keep-alive: {type(e).__name__}"
        if r.status != 200:
            return f"status {r.status}"
        if len(body) != int(r.headers.get("content-length", -1)):
            return "truncated body"
        return "ok"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Load:
    """Threads sending requests until stop(); `counts` holds every outcome."""

    def __init__(self, addrs: list[tuple[str, int]], threads: int = 4, pause: float = 0.001,
                 max_seconds: float = 120.0, keep_alive: bool = False) -> None:
        self.addrs = addrs
        self.nthreads = threads
        self.pause = pause
        self.max_seconds = max_seconds  # a safety bound: load never outlives a test
        self.keep_alive = keep_alive
        self.connects = 0               # connections opened (keep-alive mode)
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._addrs_version = 0
        self._seen: dict[int, int] = {}   # thread number -> the addrs version it last used

    def _run(self, n: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        i = n
        client = KeepAliveClient(self.addrs[n % len(self.addrs)]) if self.keep_alive else None
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if client is not None:
                    outcome = client.request(i)
                else:
                    with self.lock:
                        addrs, self._seen[n] = self.addrs, self._addrs_version
                    addr = addrs[i % len(addrs)]
                    outcome = one_request(addr, REQUESTS[i % len(REQUESTS)])
                with self.lock:
                    self.counts[outcome] += 1
                i += 1
                if self.pause:
                    time.sleep(self.pause)
        finally:
            if client is not None:
                client.close()
                with self.lock:
                    self.connects += client.connects

    def start(self) -> Load:
        for n in range(self.nthreads):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def set_addrs(self, addrs: list[tuple[str, int]], timeout: float = 30.0) -> None:
        """Send to `addrs` from now on; return once every thread has sent a
        request there (none is still busy with one to the old addresses)."""
        with self.lock:
            self.addrs = addrs
            self._addrs_version += 1
            version = self._addrs_version
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self._seen) == self.nthreads and min(self._seen.values()) == version:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"load threads still on the old addresses: {self._seen}")
            time.sleep(0.01)

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def wait_requests(self, n: int, timeout: float = 30.0) -> None:
        """Let at least n more requests complete (load is really flowing)."""
        start = self.total()
        deadline = time.monotonic() + timeout
        while self.total() < start + n:
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled: {dict(self.counts)}")
            time.sleep(0.02)

    def stop(self) -> collections.Counter[str]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.counts

    @property
    def failed(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if k not in ("ok", "refused")}
