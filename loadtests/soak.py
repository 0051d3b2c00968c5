"""Soak test: mixed load on a real neurohttpd for a long time while it is reloaded
and its workers are killed, counting every failed request and sampling the RSS
of every process.

    python3 loadtests/soak.py --duration 600 --reload-every 30 --kill-every 45 \\
        --png docs/soak.png --json /tmp/soak.json
    python3 loadtests/soak.py --chaos [--duration 60]      # see loadtests/soak_chaos.py

The server is `python -m neurohttp start` run from the checkout this file is
in (soak_server.py), with 2 workers on a free port.

The load (one asyncio process, --concurrency clients) mixes:
  - GET /health and POST /v1/chat on fresh connections (Connection: close);
  - the same on keep-alive connections (a request on a reused connection that
    the server closed before answering is retried once on a new connection,
    as every HTTP client does for idempotent requests; counted as "retried");
  - streamed /v1/chat (NDJSON, a model with 20 ms between tokens), checked whole;
  - GET /stats.
Every request has one outcome. "failed" requests are split in two: those in
flight on a worker at the moment this script SIGKILLed it (they cannot be
saved: the process serving them is gone), and all the others ("lost"), which
must be zero. Requests are bounded by --duration; the server is stopped by its
pid at the end, and its exit code and leftover shared memory are checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from soak_server import ROOT, SoakServer

# (t_start, t_end, kind, reason) of a failed request
Event = tuple[float, float, str, str]

CONFIG = """
[server]
bind = ["127.0.0.1:{port}"]
workers = {workers}
graceful_timeout = 10

[log]
error_log = "{error_log}"

[models.echo]
provider = "echo"

[models.slow]
provider = "echo"
token_delay_ms = 20
response = "one two three four five six seven eight"
"""

CHAT = b'{"prompt":"soak test"}'
STREAM = b'{"prompt":"soak","model":"slow","stream":true}'


def _req(method: str, path: str, body: bytes = b"", close: bool = True) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\n"
    if close:
        head += "Connection: close\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


KINDS = {
    "health": _req("GET", "/health"),
    "chat": _req("POST", "/v1/chat", CHAT),
    "stream": _req("POST", "/v1/chat", STREAM),
    "stats": _req("GET", "/stats"),
}
KA = {"health": _req("GET", "/health", close=False),
      "chat": _req("POST", "/v1/chat", CHAT, close=False)}


def check_close_response(kind: str, data: bytes) -> str:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return "no response" if not data else "truncated head"
    if not head.startswith(b"HTTP/1.1 200 "):
        return f"status {head[9:12].decode(errors='replace')}"
    if kind == "stream":
        if not body.endswith(b"0\r\n\r\n") or b'"done":true' not in body:
            return "truncated stream"
    else:
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length" and int(v) != len(body):
                return "truncated body"
    return "ok"


async def read_ka_response(reader: asyncio.StreamReader) -> bool:
    """One Content-Length response from a keep-alive connection; True if 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    await reader.readexactly(n)
    return head.startswith(b"HTTP/1.1 200 ")


class Client:
    def __init__(self, port: int, out: mp.Queue[Any], deadline: float, seed: int) -> None:
        self.port = port
        self.out = out
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.ok = 0
        self.retried = 0
        self.events: list[Event] = []  # every failure

    async def fresh(self, kind: str) -> None:
        t0 = time.time()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 15)
        except ConnectionRefusedError:
            self.events.append((t0, time.time(), kind, "refused"))
            return
        except (TimeoutError, OSError) as e:
            self.events.append((t0, time.time(), kind, f"connect {type(e).__name__}"))
            return
        try:
            writer.write(KINDS[kind])
            data = await asyncio.wait_for(reader.read(-1), 30)
            outcome = check_close_response(kind, data)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
            outcome = f"io {type(e).__name__}"
        finally:
            writer.close()
        if outcome == "ok":
            self.ok += 1
        else:
            self.events.append((t0, time.time(), kind, outcome))

    async def keepalive(self, n: int) -> None:
        """n requests on one connection, reconnecting when the server closes it."""
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for _ in range(n):
            kind = self.rng.choice(("health", "chat"))
            t0 = time.time()
            for attempt in (0, 1):
                reused = conn is not None
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(
                            asyncio.open_connection("127.0.0.1", self.port), 15)
                    reader, writer = conn
                    writer.write(KA[kind])
                    ok = await asyncio.wait_for(read_ka_response(reader), 30)
                    if ok:
                        self.ok += 1
                        if attempt:
                            self.retried += 1
                    else:
                        self.events.append((t0, time.time(), kind, "ka status"))
                    break
                except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    partial = isinstance(e, asyncio.IncompleteReadError) and e.partial
                    if reused and not partial and attempt == 0:
                        continue  # closed while idle: retry once on a new connection
                    self.events.append((t0, time.time(), kind, f"ka {type(e).__name__}"))
                    break
            if time.time() > self.deadline:
                break
            await asyncio.sleep(0.01)
            # the server may have closed it (drain, idle timeout): the next request retries
        if conn is not None:
            conn[1].close()

    async def one_client(self) -> None:
        while time.time() < self.deadline:
            r = self.rng.random()
            if r < 0.35:
                await self.fresh("health")
            elif r < 0.70:
                await self.fresh("chat")
            elif r < 0.85:
                await self.fresh("stream")
            elif r < 0.88:
                await self.fresh("stats")
            else:
                await self.keepalive(20)
            await asyncio.sleep(self.rng.uniform(0.005, 0.02))  # a moderate, steady load

    async def report(self) -> None:
        while time.time() < self.deadline + 1:
            await asyncio.sleep(1.0)
            self.out.put(("tick", time.time(), self.ok, self.retried, self.events))
            self.events = []

    async def main(self, concurrency: int) -> None:
        rep = asyncio.ensure_future(self.report())
        await asyncio.gather(*(self.one_client() for _ in range(concurrency)))
        await asyncio.sleep(1.2)
        rep.cancel()
        self.out.put(("done", time.time(), self.ok, self.retried, self.events))


def load_process(port: int, out: mp.Queue[Any], deadline: float, concurrency: int,
                 seed: int) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Client(port, out, deadline, seed).main(concurrency))


def rss_sample(server: SoakServer) -> dict[str, float]:
    """RSS in MiB of the master and each worker, named "master PID", "worker PID"."""
    sample = server.rss_mb([server.pid] + server.worker_pids())
    return {f"{'master' if pid == server.pid else 'worker'} {pid}": mb
            for pid, mb in sample.items()}


def span(text: str) -> tuple[float, float]:
    """ "A" or "A,B": an interval of A seconds, or a random one between A and B."""
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
        raise argparse.ArgumentTypeError(f"expected A or A,B with 0 <= A <= B: {text!r}")
    return parts[0], parts[1]


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--chaos", action="store_true",
                    help="chaos mode: keep-alive clients without retries, HUP bursts, "
                         "kill -9, SIGSTOP, a slow reader, a tiny-chunk uploader "
                         "(loadtests/soak_chaos.py)")
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reload-every", type=span, default=None,
                    help="seconds between reloads, A or A,B (default 30; chaos: 1,3)")
    ap.add_argument("--kill-every", type=span, default=None,
                    help="seconds between kill -9 of a worker (default 45; chaos: 15,30)")
    ap.add_argument("--concurrency", type=int, default=12, help="clients (default mode)")
    ap.add_argument("--png", default=None,
                    help="plot (default docs/soak.png; chaos: docs/soak-chaos.png)")
    ap.add_argument("--json", default="", help="write the summary here as JSON")
    chaos = ap.add_argument_group("chaos mode")
    chaos.add_argument("--clients", default="10,50,100",
                       help="keep-alive clients; a list runs one equal stage per level")
    chaos.add_argument("--think", type=float, default=0.05,
                       help="mean seconds a keep-alive client waits between requests")
    chaos.add_argument("--load-procs", type=int, default=2,
                       help="processes the keep-alive clients are spread over")
    chaos.add_argument("--burst-every", type=span, default=span("20,40"),
                       help="seconds between HUP bursts")
    chaos.add_argument("--burst-size", type=int, default=5, help="HUPs within 0.5 s")
    chaos.add_argument("--stop-every", type=span, default=span("15,30"),
                       help="seconds between SIGSTOPs of a worker")
    chaos.add_argument("--stop-for", type=span, default=span("2,5"),
                       help="seconds until its SIGCONT (keep below worker_timeout, 30)")
    chaos.add_argument("--slow-readers", type=int, default=1)
    chaos.add_argument("--slow-kb", type=int, default=64,
                       help="the slow reader's prompt, streamed back (about 3.5x as NDJSON)")
    chaos.add_argument("--slow-rate", type=int, default=16384,
                       help="bytes/s the slow reader reads")
    chaos.add_argument("--uploaders", type=int, default=1)
    chaos.add_argument("--upload-kb", type=int, default=256,
                       help="body of each upload, sent in 1-2 byte chunks")
    chaos.add_argument("--timeout", type=float, default=60.0,
                       help="client socket timeout: a request silent this long is lost "
                            "(above graceful_timeout, 30, so a draining worker that holds a "
                            "request to the end shows as the server's doing)")
    chaos.add_argument("--seed", type=int, default=1)
    chaos.add_argument("--out-md", default="", help="write the summary here as markdown")
    args = ap.parse_args()
    chaos_mode = bool(args.chaos)
    if args.reload_every is None:
        args.reload_every = span("1,3" if chaos_mode else "30")
    if args.kill_every is None:
        args.kill_every = span("15,30" if chaos_mode else "45")
    if args.png is None:
        args.png = str(ROOT / "docs" / ("soak-chaos.png" if chaos_mode else "soak.png"))
    return args


def main() -> int:
    args = arguments()
    if args.chaos:
        import soak_chaos
        return soak_chaos.run(args)
    server = SoakServer(CONFIG, args.workers)
    try:
        server.start(20)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    time.sleep(0.5)
    pid_file = server.pid_file
    env = server.env

    q: mp.Queue[Any] = mp.Queue()
    start = time.time()
    end = start + args.duration
    loader = mp.Process(target=load_process, args=(server.port, q, end, args.concurrency, 1))
    loader.start()
    reloads: list[float] = []
    kills: list[tuple[float, int]] = []
    rss: list[tuple[float, dict[str, float]]] = []
    ticks: list[tuple[float, int]] = []
    events: list[Event] = []
    ok = retried = 0
    rng = random.Random(7)
    next_reload = start + rng.uniform(*args.reload_every)
    next_kill = start + rng.uniform(*args.kill_every)
    next_sample = start
    done = False
    try:
        while not done:
            now = time.time()
            if now >= next_sample:
                rss.append((now - start, rss_sample(server)))
                next_sample += 2.0
            if now < end and now >= next_reload:
                r = subprocess.run([sys.executable, "-m", "neurohttp", "reload", "--pid-file",
                                    pid_file], env=env, capture_output=True, text=True,
                                   timeout=30)
                if r.returncode != 0:
                    print("reload failed:", r.stderr, file=sys.stderr)
                reloads.append(time.time())
                next_reload += rng.uniform(*args.reload_every)
            if now < end and now >= next_kill:
                kids = server.worker_pids()
                if kids:
                    victim = rng.choice(kids)
                    kills.append((time.time(), victim))
                    os.kill(victim, signal.SIGKILL)
                next_kill += rng.uniform(*args.kill_every)
            while True:
                try:
                    msg = q.get(timeout=0.2)
                except Exception:
                    break
                kind, t, ok, retried, ev = msg
                ticks.append((t - start, ok))
                events += ev
                if kind == "done":
                    done = True
            if time.time() > end + 60:
                print("the load process did not finish", file=sys.stderr)
                break
    finally:
        loader.join(10)
        if loader.is_alive():
            loader.kill()
        code, shm_left = server.stop(60)

    # A failure is excused only if it was in flight when a worker was SIGKILLed.
    kill_times = [k for k, _ in kills]
    in_flight = [e for e in events if any(e[0] <= k <= e[1] + 0.05 for k in kill_times)]
    lost = [e for e in events if e not in in_flight]
    total = ok + len(events)
    worker_peak: dict[str, float] = {}
    for _, sample in rss:
        for name, mb in sample.items():
            worker_peak[name] = max(worker_peak.get(name, 0), mb)
    workers_rss = [mb for _, s in rss for n, mb in s.items() if n.startswith("worker")]
    master_rss = [mb for _, s in rss for n, mb in s.items() if n.startswith("master")]
    summary = {
        "duration_s": args.duration, "reload_every": args.reload_every[0],
        "kill_every": args.kill_every[0], "requests": total, "ok": ok,
        "retried_on_reused_keepalive": retried,
        "failed_in_flight_on_killed_worker": len(in_flight), "failed_lost": len(lost),
        "lost": [list(e) for e in lost][:50],
        "in_flight_reasons": sorted({e[3] for e in in_flight}),
        "reloads": len(reloads), "kills": len(kills), "server_exit": code,
        "shm_left": shm_left,
        "req_per_s": round(total / args.duration, 1),
        "worker_rss_mb": {"min": round(min(workers_rss), 1), "max": round(max(workers_rss), 1)},
        "master_rss_mb": {"first": round(master_rss[0], 1), "last": round(master_rss[-1], 1),
                          "max": round(max(master_rss), 1)},
        "worker_processes_seen": sum(1 for n in worker_peak if n.startswith("worker")),
        "error_log": str(server.error_log),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    plot(args.png, start, rss, ticks, events, in_flight, lost, reloads, kills, summary)
    return 0 if not lost and code == 0 and not shm_left else 1


def plot(path: str, start: float, rss: list[tuple[float, dict[str, float]]],
         ticks: list[tuple[float, int]], events: list[Event], in_flight: list[Event],
         lost: list[Event], reloads: list[float], kills: list[tuple[float, int]],
         summary: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    series: dict[str, list[tuple[float, float]]] = {}
    for t, sample in rss:
        for name, mb in sample.items():
            series.setdefault(name, []).append((t, mb))
    for name, pts in series.items():
        px, py = zip(*pts, strict=True)
        if name.startswith("master"):
            ax1.plot(px, py, color="black", lw=2, label="master")
        else:
            ax1.plot(px, py, color="tab:blue", lw=1, alpha=0.7)
    ax1.plot([], [], color="tab:blue", label="workers (one line per process)")
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_ylim(bottom=0)
    ax1.set_title(f"neurohttpd soak: {summary['duration_s']:.0f} s, {summary['requests']} "
                  f"requests, reload every {summary['reload_every']:g} s, kill -9 of a worker "
                  f"every {summary['kill_every']:g} s")
    # requests per second from the cumulative ok counts
    ticks = sorted(ticks)
    xs = [t for t, _ in ticks[1:]]
    rate = [(b - a) / max(1e-3, tb - ta) for (ta, a), (tb, b) in zip(ticks, ticks[1:],
                                                                     strict=False)]
    ax2.plot(xs, rate, color="tab:green", lw=1, label="ok requests/s")
    ax2.set_ylabel("requests/s")
    ax2.set_xlabel("seconds")
    ax3 = ax2.twinx()
    for evs, color, label in ((in_flight, "tab:orange", "failed: in flight on a killed worker"),
                              (lost, "tab:red", "failed: lost (must be 0)")):
        ends = sorted(e[1] - start for e in evs)
        ax3.step([0] + ends + [summary["duration_s"]], [0] + list(range(1, len(ends) + 1))
                 + [len(ends)], where="post", color=color, lw=2, label=label)
    ax3.set_ylabel("failed requests (cumulative)")
    ax3.set_ylim(bottom=0, top=max(5, len(in_flight) + len(lost)) * 1.2)
    for ax in (ax1, ax2):
        for t in reloads:
            ax.axvline(t - start, color="tab:purple", lw=0.6, alpha=0.5)
        for t, _ in kills:
            ax.axvline(t - start, color="tab:red", lw=0.8, alpha=0.6, ls="--")
    ax2.plot([], [], color="tab:purple", lw=0.6, label="reload")
    ax2.plot([], [], color="tab:red", lw=0.8, ls="--", label="kill -9 of a worker")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)
    ax1.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
