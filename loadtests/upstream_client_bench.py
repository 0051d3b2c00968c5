"""What an upstream HTTP client costs the gateway: CPU per proxied request and
the RSS its import adds. The choice of the gateway's client rests on it
(issue 11 item 1; docs/PERFORMANCE.md, "Upstream client").

    python loadtests/upstream_client_bench.py [--clients neurohttp,aiohttp,httpx,floor]
                                              [--n 2000] [--conc 1,32] [--json FILE]

nginx (started here on a free port, stopped by pid) answers a fixed chat
completion; each client runs in its own process on uvloop and POSTs a small
JSON body with an Authorization header, reads the whole answer and parses it
with orjson. For each client and concurrency: CPU (user+sys of the client
process) and wall time per request, after a warm-up. `floor` is the lead's
first cut: a bare asyncio Protocol on httptools with no pool bound, timeouts,
checks or streaming, i.e. the least a client can cost. RSS: what importing
the client adds to a process that has uvloop and orjson, and that plus a
first request (a fresh process per client). CPU is the best of --repeat runs.

Numbers are rough on a shared machine: compare clients within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from nginx_server import Nginx  # noqa: E402

# Runs in a child process: argv = kind port conc n
CHILD = r'''
import asyncio, os, sys, time
sys.path.insert(0, ROOT)
import orjson, uvloop

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

kind, port, conc, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BODY = orjson.dumps({"model": "up", "messages": [{"role": "user", "content": "Hello"}]})
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
URL = f"http://127.0.0.1:{port}/v1/chat/completions"
rss0 = rss()

if kind == "neurohttp":
    from neurohttp.upstream import HeaderBlock, PoolLimits, UpstreamClient
    def make():
        pool = UpstreamClient().pool(URL, limits=PoolLimits(max_connections=conc))
        block = HeaderBlock(HEADERS)
        async def one():
            r = await pool.request("POST", "/v1/chat/completions", headers=block, body=BODY)
            return r.status, await r.read()
        return one
elif kind == "aiohttp":
    import aiohttp
    def make():
        sess = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc))
        async def one():
            async with sess.post(URL, data=BODY, headers=HEADERS) as r:
                return r.status, await r.read()
        return one
elif kind == "httpx":
    import httpx
    def make():
        cli = httpx.AsyncClient(limits=httpx.Limits(max_connections=conc))
        async def one():
            r = await cli.post(URL, content=BODY, headers=HEADERS)
            return r.status_code, r.content
        return one
elif kind == "floor":
    import httptools
    class Conn(asyncio.Protocol):
        def __init__(self):
            self.parser = httptools.HttpResponseParser(self); self.fut = None; self.body = []
        def connection_made(self, t): self.t = t
        def data_received(self, d): self.parser.feed_data(d)
        def on_body(self, b): self.body.append(b)
        def on_message_complete(self):
            f, self.fut = self.fut, None
            body = b"".join(self.body); self.body = []
            f.set_result((self.parser.get_status_code(), body))
        def connection_lost(self, exc):
            if self.fut and not self.fut.done(): self.fut.set_exception(ConnectionError())
    def make():
        idle = []
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"
                b"Content-Length: " % port)
        async def one():
            loop = asyncio.get_running_loop()
            if idle: c = idle.pop()
            else: _, c = await loop.create_connection(Conn, "127.0.0.1", port)
            c.fut = loop.create_future()
            c.t.write(head + b"%d\r\n\r\n" % len(BODY) + BODY)
            st, b = await c.fut
            idle.append(c)
            return st, b
        return one
else:
    raise SystemExit(f"unknown client {kind}")
rss_import = rss()

async def run():
    one = make()
    async def worker(k):
        for _ in range(k):
            st, b = await one()
            assert st == 200, st
            orjson.loads(b)
    await worker(1)
    rss1 = rss()
    await asyncio.gather(*(worker(50) for _ in range(conc)))  # warm
    c0 = time.process_time(); w0 = time.perf_counter()
    await asyncio.gather(*(worker(n) for _ in range(conc)))
    c1 = time.process_time(); w1 = time.perf_counter()
    tot = n * conc
    print(orjson.dumps({"client": kind, "conc": conc, "requests": tot,
                        "cpu_us": 1e6 * (c1 - c0) / tot, "wall_us": 1e6 * (w1 - w0) / tot,
                        "rss_base_mib": rss0 / 2**20,
                        "rss_import_mib": (rss_import - rss0) / 2**20,
                        "rss_added_mib": (rss1 - rss0) / 2**20}).decode())

uvloop.run(run())
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="neurohttp,aiohttp,httpx,floor")
    ap.add_argument("--conc", default="1,32")
    ap.add_argument("--n", type=int, default=2000, help="requests per connection at conc 1")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, Nginx(Path(tmp)) as ng:
        for kind in args.clients.split(","):
            for conc in map(int, args.conc.split(",")):
                n = args.n if conc == 1 else max(50, args.n // 8)
                best: dict[str, float] | None = None
                for _ in range(args.repeat):
                    out = subprocess.run(
                        [sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + CHILD, kind,
                         str(ng.port), str(conc), str(n)],
                        check=True, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    if best is None or r["cpu_us"] < best["cpu_us"]:
                        best = r
                assert best is not None
                results.append(best)
                print(f"{kind:10s} conc={conc:3d}  cpu/req {best['cpu_us']:7.1f} us  "
                      f"wall/req {best['wall_us']:7.1f} us  RSS added: import "
                      f"{best['rss_import_mib']:5.1f} MiB, with a first request "
                      f"{best['rss_added_mib']:5.1f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
