"""Python cost of one upstream request through the real client code, with no
sockets: a fake transport answers every request with nginx's chat completion
on the next loop turn. This isolates what the client costs (pool, request
head, parser, response, wake-ups) from the kernel, like micro_hotpath.py
does for the server.

    python loadtests/upstream_client_micro.py [--n 200000] [--client neurohttp|floor]

Prints ns per request (best of 5 runs). For stable counts on a busy machine,
count instructions with callgrind at two N and take the difference:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.N \\
        $(python3 -c 'import sys; print(sys.executable)') \\
        loadtests/upstream_client_micro.py --n N --runs 1

`floor` is the bare httptools Protocol of upstream_client_bench.py: the
least a client can cost.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httptools  # noqa: E402
import orjson  # noqa: E402
import uvloop  # noqa: E402

from neurohttp.upstream import HeaderBlock, UpstreamClient  # noqa: E402
from neurohttp.upstream.connection import UpstreamConnection  # noqa: E402

BODY = orjson.dumps({"model": "up", "messages": [{"role": "user", "content": "Hello"}]})
ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"up","choices":'
          b'[{"index":0,"message":{"role":"assistant","content":"Hello, AI world!"},'
          b'"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":5,'
          b'"total_tokens":14}}')
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 10 May 2026 04:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive"
            b"\r\n\r\n%s" % (len(ANSWER), ANSWER))


class FakeTransport:
    """Answers each write on the next loop turn, as a socket read would."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proto: asyncio.Protocol) -> None:
        self.loop = loop
        self.proto = proto

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.proto.data_received, RESPONSE)

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Floor(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.fut: asyncio.Future[bytes] | None = None
        self.body: list[bytes] = []
        self.t: FakeTransport | None = None

    def on_body(self, b: bytes) -> None:
        self.body.append(b)

    def on_message_complete(self) -> None:
        f, self.fut = self.fut, None
        body = b"".join(self.body)
        self.body = []
        assert f is not None
        f.set_result(body)

    def data_received(self, d: bytes) -> None:
        self.parser.feed_data(d)


def make(kind: str, loop: asyncio.AbstractEventLoop) -> Callable[[], Awaitable[bytes]]:
    if kind == "neurohttp":
        pool = UpstreamClient().pool("http://127.0.0.1:9")
        pool._loop = loop
        conn = UpstreamConnection(pool, pool.limits.max_head_bytes)
        conn.connection_made(FakeTransport(loop, conn))  # type: ignore[arg-type]
        pool._count = 1
        pool.connection_released(conn)
        headers = HeaderBlock({"Authorization": "Bearer sk-bench",
                               "Content-Type": "application/json"})

        async def ours() -> bytes:
            r = await pool.request("POST", "/v1/chat/completions", headers=headers, body=BODY)
            return await r.read()
        return ours
    c = Floor()
    c.t = FakeTransport(loop, c)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"
            b"Content-Length: ")

    async def floor() -> bytes:
        c.fut = loop.create_future()
        assert c.t is not None
        c.t.write(head + b"%d\r\n\r\n" % len(BODY) + BODY)
        return await c.fut
    return floor


async def run(kind: str, n: int, runs: int) -> float:
    one = make(kind, asyncio.get_running_loop())
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            orjson.loads(await one())
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--client", default="neurohttp", choices=["neurohttp", "floor"])
    a = ap.parse_args()
    best = uvloop.run(run(a.client, a.n, a.runs))
    print(f"{a.client}: {best * 1e9:.0f} ns per request (best of {a.runs} x {a.n})")


if __name__ == "__main__":
    main()
