"""CPU per request and req/s of a short wrk run, with and without scraping.

    python3 loadtests/metrics_cost.py [--rounds 3] [--duration 5] [--path /health]
                                      [--scrape /metrics] [--workers 2] [--root CHECKOUT]

Starts a real neurohttpd from this checkout (or --root, to compare with another
checkout, e.g. main before a change) on a free port, warms it up, then
for each round runs `wrk -t1 -c64 -dNs` once plainly and once while a client
GETs the scrape path every second (when --scrape is given). The server's CPU
time is read from /proc/<pid>/stat of the master and its workers before and
after each run, so "µs/req" is server CPU only (wrk's own CPU is excluded).
Prints one line per run and the medians. Short and bounded: it is a quick
check, not the full benchmark.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def server_cpu(master: int) -> float:
    return sum(cpu_seconds(p) for p in [master, *children(master)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def wrk(port: int, path: str, seconds: int) -> tuple[int, float]:
    out = subprocess.run(["wrk", "-t1", "-c64", f"-d{seconds}s", f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return total, rps


def scraper(port: int, path: str, stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(1.0):
        if get(port, path) == 200:
            count[0] += 1


def run(port: int, master: int, path: str, seconds: int, scrape: str | None) -> tuple[float, float, int]:
    stop = threading.Event()
    scraped = [0]
    t = None
    if scrape:
        t = threading.Thread(target=scraper, args=(port, scrape, stop, scraped), daemon=True)
        t.start()
    c0 = server_cpu(master)
    total, rps = wrk(port, path, seconds)
    c1 = server_cpu(master)
    stop.set()
    if t:
        t.join(10)
    return rps, (c1 - c0) * 1e6 / total, scraped[0]


def scrape_cost(port: int, master: int, path: str, when: str, n: int = 200) -> None:
    """What one GET of `path` costs the server by itself: n GETs in a row, nothing else."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c0 = server_cpu(master)
    size = 0
    for _ in range(n):
        conn.request("GET", path)
        size = len(conn.getresponse().read())
    c1 = server_cpu(master)
    conn.close()
    print(f"one GET {path} ({size} bytes), {when}: {(c1 - c0) * 1e3 / n:.2f} ms server CPU "
          f"(mean of {n})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--path", default="/health")
    ap.add_argument("--scrape", default=None, help="also run each round while GETting this every second")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose server to run")
    args = ap.parse_args()
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="nh-cost-")
    env = {**os.environ, "PYTHONPATH": args.root}
    proc = subprocess.Popen([sys.executable, "-m", "neurohttp", "start", "-b", f"127.0.0.1:{port}",
                             "-w", str(args.workers), "--pid-file", f"{tmp}/n.pid"],
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(port, "/health", 1.0) == 200 and len(children(proc.pid)) == args.workers:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                print("server did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        wrk(port, args.path, 1)  # warm-up
        if args.scrape:
            scrape_cost(port, proc.pid, args.scrape, "idle server")
        plain: list[tuple[float, float]] = []
        scraped: list[tuple[float, float]] = []
        for i in range(args.rounds):
            # alternate which run goes first (ABBA), so a drift in the machine's
            # load does not favour one of them
            order = [None, args.scrape] if i % 2 == 0 else [args.scrape, None]
            for scrape in order:
                if scrape is None:
                    rps, us, _ = run(port, proc.pid, args.path, args.duration, None)
                    plain.append((rps, us))
                    print(f"round {i + 1} plain:   {rps:10.0f} req/s  {us:6.2f} µs CPU/req",
                          flush=True)
                elif args.scrape:
                    rps, us, n = run(port, proc.pid, args.path, args.duration, scrape)
                    scraped.append((rps, us))
                    print(f"round {i + 1} scraped: {rps:10.0f} req/s  {us:6.2f} µs CPU/req "
                          f"({n} scrapes of {scrape})", flush=True)
        if args.scrape:
            scrape_cost(port, proc.pid, args.scrape, "after the runs (ring full of traffic)")
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        print(f"median plain:   {med(plain, 0):10.0f} req/s  {med(plain, 1):6.2f} µs CPU/req")
        if scraped:
            print(f"median scraped: {med(scraped, 0):10.0f} req/s  {med(scraped, 1):6.2f} µs CPU/req")
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
