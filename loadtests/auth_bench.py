"""POST /v1/chat under wrk with [auth] off, on with an rpm/tpm quota in shared
memory, and on with the same quota in Redis: req/s and the server's CPU per
request, the same run, rounds interleaved. Every target gets the same bytes
(the Authorization header is sent with [auth] off too).

    python loadtests/auth_bench.py [--duration 5] [--rounds 2] [--workers 1]

Needs wrk and redis-server (Debian's packages). Quote the ratios to "off"
from one run; absolute figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "nh-bench-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"
LUA = ('wrk.method = "POST"\nwrk.body = \'{"prompt":"Hello"}\'\n'
       'wrk.headers["Content-Type"] = "application/json"\n'
       f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` and its children (the workers), in clock ticks."""
    total = 0
    for p in [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    time.sleep(1.0)
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} not ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="nh-auth-bench-"))
    (d / "post.lua").write_text(LUA)
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly",
                              "no", "--dir", str(d)], stdout=subprocess.DEVNULL)
    quota = {"name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
             "rpm": 10**9, "tpm": 10**12}
    auth = ('[auth]\nenabled = true\n[[auth.keys]]\n' + "".join(
        f"{k} = {v!r}\n".replace("'", '"') for k, v in quota.items()))
    configs = {"off": "", "shm": auth,
               "redis": auth + f'[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:{rport}/0"\n'}
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    try:
        for name, text in configs.items():
            port = free_port()
            conf = d / f"{name}.toml"
            conf.write_text(f'[server]\nbind = ["127.0.0.1:{port}"]\nworkers = {args.workers}\n'
                            + text)
            proc = subprocess.Popen([sys.executable, "-m", "neurohttp", "start", "-c", str(conf),
                                     "--pid-file", str(d / f"{name}.pid")], cwd=d,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=open(d / f"{name}.log", "ab"), stderr=subprocess.STDOUT,
                                    start_new_session=True)
            procs[name] = (proc, port)
            wait_port(port, proc)
        for _ in range(args.rounds):
            for name, (proc, port) in procs.items():
                c0 = cpu_ticks(proc.pid)
                out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                                      "-s", str(d / "post.lua"), f"http://127.0.0.1:{port}/v1/chat"],
                                     capture_output=True, text=True, check=True).stdout
                cpu_s = (cpu_ticks(proc.pid) - c0) / os.sysconf("SC_CLK_TCK")
                reqs = int(out.split(" requests in ")[0].split()[-1])
                non2xx = out.split("Non-2xx or 3xx responses:")
                assert len(non2xx) == 1, f"{name}: refusals in the run:\n{out}"
                results[name].append((reqs / args.duration, cpu_s * 1e6 / reqs))
    finally:
        for proc, _ in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        redis.terminate()
        redis.wait(5)
    base = min(c for _, c in results["off"])
    print(f"{'target':8s} {'req/s (best)':>12s} {'CPU µs/req (best)':>18s} {'vs off':>7s}")
    for name, rs in results.items():
        cpu = min(c for _, c in rs)
        print(f"{name:8s} {max(r for r, _ in rs):12.0f} {cpu:18.1f} {cpu / base:7.2f}")


if __name__ == "__main__":
    main()
