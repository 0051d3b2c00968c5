"""Python cost of one proxied request through the gateway, against an upstream
in another process: the real connection code with a fake client transport (as
loadtests/micro_hotpath.py), the real `openai` provider, pool and upstream
client over loopback TCP to tests/fake_upstream.py (whose instructions are
not ours: callgrind counts this process only).

    python loadtests/micro_gateway.py [--n 2000] [--only "POST /v1/chat/completions"]

Prints ns per request (best of --runs) for the proxied requests and, for
comparison in the same harness, POST /v1/chat on the echo model. Callgrind
(instructions per request, stable on a busy machine):

    for n in 200 1000; do PYTHONHASHSEED=0 valgrind --tool=callgrind \
      --callgrind-out-file=/tmp/cgg.$n python3 loadtests/micro_gateway.py \
      --n $n --runs 1 --only "proxied POST /v1/chat/completions"; done
    # instructions/request = (summary of cgg.1000 - summary of cgg.200) / 800
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_upstream import FakeUpstream  # noqa: E402
from micro_hotpath import FakeTransport as BaseTransport  # noqa: E402

from neurohttp import config  # noqa: E402
from neurohttp.stats.block import StatsBlock  # noqa: E402
from neurohttp.stats.sizing import geometry_for  # noqa: E402
from neurohttp.worker.connection import HttpConnection  # noqa: E402
from neurohttp.worker.worker import Worker, new_event_loop  # noqa: E402


class FakeTransport(BaseTransport):
    """The client side: records writes, counts responses begun (the rest of
    the transport is micro_hotpath's)."""

    def __init__(self) -> None:
        super().__init__()
        self.responses = 0
        self.waiter: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.out += len(data)
        if data.startswith(b"HTTP/1.1 "):
            self.responses += 1
        if data.endswith((b"}", b"0\r\n\r\n")):  # a whole body, or a stream's last chunk
            w = self.waiter
            if w is not None and not w.done():
                w.set_result(None)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def post(path: str, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: {len(data)}\r\n"
            f"Content-Type: application/json\r\n\r\n").encode() + data


ASK = [{"role": "user", "content": "Hello"}]
REQUESTS = {
    "echo POST /v1/chat": post("/v1/chat", {"prompt": "Hello"}),
    "proxied POST /v1/chat": post("/v1/chat", {"prompt": "Hello", "model": "up"}),
    "proxied POST /v1/chat/completions": post("/v1/chat/completions",
                                              {"model": "up", "messages": ASK}),
    "proxied stream /v1/chat/completions": post("/v1/chat/completions",
                                                {"model": "up", "messages": ASK,
                                                 "stream": True}),
    # 20 content events (23 with role, finish and usage) arriving in one read,
    # as from nginx in gateway_bench.py
    "proxied stream, 20 events in one read": post("/v1/chat/completions",
                                                  {"model": "up-burst", "messages": ASK,
                                                   "stream": True}),
}


async def drive(conn: HttpConnection, t: FakeTransport, raw: bytes, n: int) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(n):
        t.waiter = loop.create_future()
        conn.data_received(raw)
        await t.waiter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="micro-gw-"))
    up = FakeUpstream(tmp).start()
    os.environ["MICRO_GW_KEY"] = "sk-bench"
    try:
        up.set_behaviour("chat;content=Hello there, world;echo=0")  # a real answer: no echo object
        cfg = config.from_dict({"models": {
            "echo": {"provider": "echo"},
            "up": {"provider": "openai", "base_url": up.url + "/v1", "model": "bench",
                   "api_key_env": "MICRO_GW_KEY"},
            "up-burst": {"provider": "openai", "base_url": up.url + "/v1",
                         "model": "fake:stream;count=20;burst=1",
                         "api_key_env": "MICRO_GW_KEY"}}})
        block = StatsBlock.create(f"neurohttp-microgw-{os.getpid()}", geometry_for(cfg))
        try:
            idx = block.reserve_slot(1, 1)
            w = Worker(cfg, block, idx, 1, [], 0)
            w.build()  # plugins, models, services, routes (the worker's start does this)
            loop = w.loop = new_event_loop("auto")  # uvloop, as the worker runs
            asyncio.set_event_loop(loop)
            from neurohttp.ai import tokenizer
            tokenizer.preload()
            for name, raw in REQUESTS.items():
                if args.only and name != args.only:
                    continue
                conn = HttpConnection(w.conn_settings, w)
                t = FakeTransport()
                conn.connection_made(t)
                loop.run_until_complete(drive(conn, t, raw, 20))  # warm: pool, caches
                best = float("inf")
                for _ in range(args.runs):
                    t0 = time.perf_counter_ns()
                    loop.run_until_complete(drive(conn, t, raw, args.n))
                    best = min(best, (time.perf_counter_ns() - t0) / args.n)
                print(f"{name:38s} {best:9.0f} ns/request (wall, upstream included)")
            w.upstream.close()
        finally:
            block.unlink()
    finally:
        up.stop()


if __name__ == "__main__":
    main()
