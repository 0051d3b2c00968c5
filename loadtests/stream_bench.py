"""Streaming benchmark: NeuroHTTP's /v1/chat/completions SSE stream beside
uvicorn serving the same stream from a raw ASGI app (loadtests/asgi_stream.py),
both with 2 workers, in the same run. Both servers stay up; `--rounds` rounds
alternate between them, and the table gives the medians (the machine is
shared, so a single round says little).

    python loadtests/stream_bench.py [--streams 1000] [--tokens 100] [--delay-ms 20]
                                     [--rounds 3] [--python /tmp/benchvenv/bin/python]

1. paced: `--streams` concurrent streams of `--tokens` tokens at `--delay-ms`
   pacing (starts spread over 1 s). Reported: the gap between consecutive
   tokens as the client receives them (p50/p99/max), time to first token,
   tokens/s delivered, and the CPU the servers and the client used.
2. zero delay: long unpaced streams, C at a time, for a fixed window. The
   tokens/s delivered is the most the server can push. Also reported: the
   server's CPU time per token (its workers' user+sys time / tokens), which
   other load on the machine does not change much.
3. zero delay, short: `--streams` streams of `--tokens` unpaced tokens at once
   (connection, request and stream set-up included).

The client is one uvloop process with raw sockets. It counts token events
with bytes.count, so it costs far less than the servers. The uvicorn peer
needs uvicorn, uvloop, httptools and orjson in the `--python` environment
(/tmp/benchvenv from shared/bench/peers.sh, or
`python3 -m venv /tmp/streamvenv && /tmp/streamvenv/bin/pip install uvicorn uvloop httptools orjson`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TOKEN = b'"delta":{"content":'  # only token events carry this (the role event starts with "role")
DONE = b"data: [DONE]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------ servers
class Proc:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None,
                 cwd: str | None = None) -> None:
        self.name = name
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix=f"stream_bench_{name}_", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited: see {self.log.name}")
            try:
                body = json.dumps({"model": "instant", "messages": [{"role": "user",
                                   "content": "hi"}], "max_tokens": 3, "stream": True}).encode()
                r = urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions", body,
                    {"Content-Type": "application/json"}), timeout=2)
                if DONE in r.read():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} did not start: see {self.log.name}")
            time.sleep(0.2)
        time.sleep(1.0)  # let every worker finish starting

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def cpu(self) -> float:
        total = 0.0
        for p in self.workers():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                for p in self.workers():
                    p.kill()
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def start_neurohttp(port: int, workers: int, delay_ms: float, tmp: Path) -> Proc:
    cfg = tmp / "neurohttp.toml"
    cfg.write_text(f"""
[server]
graceful_timeout = 5.0
[log]
level = "warning"
[models.paced]
provider = "echo"
token_delay_ms = {delay_ms}
repeat = true
split = "token"
max_output_tokens = 1000000000
[models.instant]
provider = "echo"
repeat = true
split = "token"
max_output_tokens = 1000000000
""")
    return Proc("neurohttp", [sys.executable, "-m", "neurohttp", "start", "-c", str(cfg),
                              "-w", str(workers), "-b", f"127.0.0.1:{port}",
                              "--pid-file", str(tmp / "bench.pid")],
                port, env={"PYTHONPATH": str(ROOT)}, cwd=str(tmp))


def start_uvicorn(port: int, workers: int, python: str, delay_ms: float) -> Proc:
    """The ASGI peer, pacing its "paced" model at `delay_ms` as neurohttp's is."""
    return Proc("uvicorn", [python, "-m", "uvicorn", "asgi_stream:app", "--app-dir",
                            str(ROOT / "loadtests"), "--workers", str(workers), "--loop",
                            "uvloop", "--http", "httptools", "--no-access-log", "--log-level",
                            "warning", "--backlog", "4096", "--port", str(port)], port,
                env={"ASGI_STREAM_DELAY_MS": repr(delay_ms)})


# ------------------------------------------------------------ client
class StreamClient(asyncio.Protocol):
    """One streamed request on its own connection (Connection: close)."""

    def __init__(self, request: bytes, gaps: list[float] | None, done: asyncio.Future) -> None:
        self.request = request
        self.gaps = gaps
        self.done = done
        self.tokens = 0
        self.tail = b""
        self.last = 0.0
        self.t0 = 0.0
        self.ttft = 0.0
        self.finished = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t0 = time.perf_counter()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.tail + data
        k = buf.count(TOKEN)
        self.tail = buf[-(len(TOKEN) - 1):]
        if k:
            if self.tokens == 0:
                self.ttft = now - self.t0
            elif self.gaps is not None:
                self.gaps.append(now - self.last)
            if self.gaps is not None and k > 1:
                self.gaps.extend([0.0] * (k - 1))  # arrived together
            self.tokens += k
            self.last = now
        if not self.finished and DONE in buf:
            self.finished = True

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(self)


def request_bytes(port: int, model: str, tokens: int) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}],
                       "max_tokens": tokens, "stream": True}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


async def open_stream(port: int, req: bytes, gaps: list | None, delay: float = 0.0):
    loop = asyncio.get_running_loop()
    if delay:
        await asyncio.sleep(delay)
    done = loop.create_future()
    for attempt in range(5):
        try:
            await loop.create_connection(lambda: StreamClient(req, gaps, done), "127.0.0.1", port)
            break
        except OSError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.1)
    return await done


async def gather_bounded(coros: list, timeout: float) -> list:
    """Results (or exceptions) of all; whatever is not done after `timeout` s is
    cancelled and reported as a TimeoutError."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    await asyncio.wait(tasks, timeout=timeout)
    out = []
    for t in tasks:
        if not t.done():
            t.cancel()
            out.append(TimeoutError("stream not finished"))
        elif t.exception() is not None:
            out.append(t.exception())
        else:
            out.append(t.result())
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def paced_run(port: int, streams: int, tokens: int, model: str, ramp: float,
                    server: Proc) -> dict:
    gaps: list[float] = []
    cpu0 = server.cpu()
    me = psutil.Process()
    c0 = me.cpu_times()
    t0 = time.perf_counter()
    req = request_bytes(port, model, tokens)
    results = await gather_bounded([open_stream(port, req, gaps, random.random() * ramp)
                                    for _ in range(streams)], 120)
    wall = time.perf_counter() - t0
    cpu = server.cpu() - cpu0
    c1 = me.cpu_times()
    client_cpu = (c1.user + c1.system - c0.user - c0.system) / wall
    ok = [r for r in results if isinstance(r, StreamClient)]
    complete = [r for r in ok if r.finished and r.tokens == tokens]
    total = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.tokens]
    return {"streams": streams, "complete": len(complete), "errors": len(results) - len(ok),
            "tokens": total, "wall_s": wall, "tokens_per_s": total / wall,
            "gap_p50_ms": pct(gaps, 0.50) * 1e3, "gap_p99_ms": pct(gaps, 0.99) * 1e3,
            "gap_max_ms": max(gaps) * 1e3 if gaps else float("nan"),
            "ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
            "cpu_us_per_token": cpu / total * 1e6 if total else float("nan"),
            "server_cores": cpu / wall, "client_cores": client_cpu}


async def sustained_run(port: int, conc: int, seconds: float, server: Proc) -> dict:
    """`conc` endless unpaced streams; count the tokens delivered in a window."""
    loop = asyncio.get_running_loop()
    req = request_bytes(port, "instant", 1_000_000_000)
    clients: list[StreamClient] = []
    futs = []
    for _ in range(conc):
        done = loop.create_future()
        c = StreamClient(req, None, done)
        await loop.create_connection(lambda c=c: c, "127.0.0.1", port)
        clients.append(c)
        futs.append(done)
    await asyncio.sleep(1.0)  # warm up
    n0, cpu0, t0 = sum(c.tokens for c in clients), server.cpu(), time.perf_counter()
    await asyncio.sleep(seconds)
    n1, cpu1, t1 = sum(c.tokens for c in clients), server.cpu(), time.perf_counter()
    for c in clients:
        c.transport.close()
    await asyncio.wait(futs, timeout=10)
    tokens = n1 - n0
    return {"conc": conc, "tokens": tokens, "tokens_per_s": tokens / (t1 - t0),
            "cpu_us_per_token": (cpu1 - cpu0) / tokens * 1e6 if tokens else float("nan")}


async def short_run(port: int, streams: int, tokens: int, server: Proc) -> dict:
    cpu0 = server.cpu()
    t0 = time.perf_counter()
    req = request_bytes(port, "instant", tokens)
    results = await gather_bounded([open_stream(port, req, None) for _ in range(streams)], 120)
    wall = time.perf_counter() - t0
    cpu = server.cpu() - cpu0
    ok = [r for r in results if isinstance(r, StreamClient)]
    total = sum(r.tokens for r in ok)
    return {"streams": streams, "complete": sum(1 for r in ok if r.finished and
                                                r.tokens == tokens),
            "tokens_per_s": total / wall, "wall_s": wall,
            "cpu_us_per_token": cpu / total * 1e6 if total else float("nan")}


def bench(server: Proc, args) -> dict:
    out = {}
    print(f"[{server.name}] paced: {args.streams} streams x {args.tokens} tokens "
          f"at {args.delay_ms:g} ms", flush=True)
    out["paced"] = run(paced_run(server.port, args.streams, args.tokens, "paced", 1.0, server))
    print("   ", fmt(out["paced"]), flush=True)
    if args.paced_only:
        return out
    out["sustained"] = []
    for conc in args.conc:
        print(f"[{server.name}] zero delay: {conc} endless streams for {args.seconds:g} s",
              flush=True)
        r = run(sustained_run(server.port, conc, args.seconds, server))
        out["sustained"].append(r)
        print("   ", fmt(r), flush=True)
    print(f"[{server.name}] zero delay: {args.streams} streams x {args.tokens} tokens at once",
          flush=True)
    out["short"] = run(short_run(server.port, args.streams, args.tokens, server))
    print("   ", fmt(out["short"]), flush=True)
    return out


def run(coro):
    """Run on uvloop, as the servers do (asyncio.run has no loop_factory before 3.12)."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conc", type=int, nargs="+", default=[64])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--python", default="/tmp/benchvenv/bin/python",
                    help="interpreter with uvicorn, uvloop, httptools, orjson ('' to skip)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--servers", default="neurohttp,uvicorn", help="which to run")
    ap.add_argument("--paced-only", action="store_true", help="only the paced run (profiling)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, alternating the servers")
    ap.add_argument("--hold", type=float, default=0,
                    help="seconds to wait after starting each server (to attach a profiler)")
    args = ap.parse_args()
    # a TERM (or timeout) still runs the finally blocks that stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [n for n in args.servers.split(",")
             if n == "neurohttp" or (n == "uvicorn" and args.python and Path(args.python).exists())]
    results: dict[str, list[dict]] = {n: [] for n in names}
    servers: dict[str, Proc] = {}
    with tempfile.TemporaryDirectory(prefix="stream_bench_") as tmp:
        try:
            # Both servers stay up (idle) for the whole run; the rounds alternate
            # between them so the machine's other load falls on both alike.
            if "neurohttp" in names:
                servers["neurohttp"] = start_neurohttp(free_port(), args.workers, args.delay_ms,
                                                       Path(tmp))
            if "uvicorn" in names:
                servers["uvicorn"] = start_uvicorn(free_port(), args.workers, args.python,
                                                   args.delay_ms)
            if args.hold:
                for n, srv in servers.items():
                    print(f"{n} workers:", [p.pid for p in srv.workers()], flush=True)
                time.sleep(args.hold)
            for r in range(args.rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    print(f"--- round {r + 1}/{args.rounds}", flush=True)
                    results[n].append(bench(servers[n], args))
        finally:
            for srv in servers.values():
                srv.stop()
    print()
    print(table(results, args))
    for n, rounds in results.items():
        # Both sides must pace alike, or the side-by-side figures compare different loads.
        gap = med(rounds, lambda r: r["paced"]["gap_p50_ms"])
        if args.delay_ms and not 0.75 * args.delay_ms <= gap <= 1.5 * args.delay_ms:
            print(f"warning: {n} paced its tokens {gap:.1f} ms apart (p50), not the "
                  f"{args.delay_ms:g} ms asked for", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def med(rounds: list[dict], get) -> float:
    vals = sorted(get(r) for r in rounds)
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def table(results: dict, args) -> str:
    """Medians over the rounds."""
    names = list(results)
    lines = [f"| {args.streams} streams x {args.tokens} tokens, {args.workers} workers, "
             f"median of {args.rounds} | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]

    def row(label: str, fmt_: str, *gets) -> None:
        cells = []
        for n in names:
            cells.append(" / ".join(fmt_.format(med(results[n], g)) for g in gets))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    P = "paced"
    row(f"paced {args.delay_ms:g} ms: streams complete (of {args.streams})", "{:.0f}",
        lambda r: r[P]["complete"])
    row("paced: inter-token gap p50 / p99 / max (ms)", "{:.1f}",
        lambda r: r[P]["gap_p50_ms"], lambda r: r[P]["gap_p99_ms"], lambda r: r[P]["gap_max_ms"])
    row("paced: time to first token p50 / p99 (ms)", "{:.1f}",
        lambda r: r[P]["ttft_p50_ms"], lambda r: r[P]["ttft_p99_ms"])
    row("paced: tokens/s delivered", "{:,.0f}", lambda r: r[P]["tokens_per_s"])
    row("paced: server CPU µs/token", "{:.1f}", lambda r: r[P]["cpu_us_per_token"])
    row("paced: cores busy, server / bench client", "{:.2f}",
        lambda r: r[P]["server_cores"], lambda r: r[P]["client_cores"])
    if args.paced_only:
        return "\n".join(lines)
    for i, conc in enumerate(args.conc):
        row(f"zero delay, {conc} long streams: tokens/s", "{:,.0f}",
            lambda r, i=i: r["sustained"][i]["tokens_per_s"])
        row(f"zero delay, {conc} long streams: server CPU µs/token", "{:.2f}",
            lambda r, i=i: r["sustained"][i]["cpu_us_per_token"])
    row(f"zero delay, {args.streams} x {args.tokens}-token streams: tokens/s", "{:,.0f}",
        lambda r: r["short"]["tokens_per_s"])
    row(f"zero delay, {args.streams} x {args.tokens}-token streams: complete", "{:.0f}",
        lambda r: r["short"]["complete"])
    row(f"zero delay, {args.streams} x {args.tokens}-token streams: server CPU µs/token",
        "{:.1f}", lambda r: r["short"]["cpu_us_per_token"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
