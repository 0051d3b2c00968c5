"""TLS cost: neurohttpd beside nginx, each with 2 workers, serving GET /health
plain and over TLS with the same certificate, under the same wrk load.

Four cases per server: plain and TLS, each with keep-alive and with a fresh
connection per request (wrk -H 'Connection: close': over TLS, a full
handshake per request). For each: req/s and the server's CPU per request
(utime + stime of the master and workers, from /proc, over the measured
window), then the issue's target: our CPU per TLS request at most 2x nginx's,
keep-alive and fresh handshakes. The TLS share (TLS case minus plain case) is
shown too: it is what TLS itself costs each server.

    python loadtests/tls_bench.py                     # 3 rounds, 10 s per case
    python loadtests/tls_bench.py --rounds 1 --duration 3
    python loadtests/tls_bench.py --key-type rsa      # RSA 2048 instead of ECDSA P-256

The certificate comes from a throwaway CA (trustme). wrk and nginx as for
../shared/bench/peers.sh (its /proc helpers and wrk's report.lua are used).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

ROOT = Path(__file__).resolve().parent.parent
SHARED_BENCH = next((p for p in (ROOT.parent / "shared" / "bench", Path("/work/shared/bench"))
                     if p.exists()), ROOT.parent / "shared" / "bench")
sys.path.insert(0, str(SHARED_BENCH))
from run_peers import LUA_REPORT, cpu_by_pid, process_tree  # noqa: E402

NGINX = "/usr/sbin/nginx"
CASES = [("plain", "keep-alive"), ("tls", "keep-alive"), ("plain", "close"), ("tls", "close")]


def log(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    plain_port: int
    tls_port: int
    cmd: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    proc: subprocess.Popen[bytes] | None = None

    def start(self, ca_file: Path, timeout: float = 30) -> None:
        logf = open(self.cwd / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        ctx = ssl.create_default_context(cafile=str(ca_file))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}; see "
                                   f"{self.cwd / (self.name + '.log')}")
            try:
                with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        time.sleep(1.0)  # every worker up
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready on port {self.tls_port}")

    def tree(self) -> list[int]:
        return process_tree([self.proc.pid]) if self.proc else []

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


def nginx_target(d: Path, cert: Path, key: Path) -> Target:
    plain, tls = free_port(), free_port()
    (d / "nginx").mkdir(exist_ok=True)
    conf = d / "nginx" / "nginx.conf"
    n = d / "nginx"
    conf.write_text(f"""
worker_processes 2;
daemon off;
master_process on;
pid {n}/nginx.pid;
error_log {n}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {n}/body;
    proxy_temp_path {n}/proxy;
    fastcgi_temp_path {n}/fastcgi;
    uwsgi_temp_path {n}/uwsgi;
    scgi_temp_path {n}/scgi;
    keepalive_requests 1000000;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen 127.0.0.1:{plain};
        listen 127.0.0.1:{tls} ssl;
        location = /health {{
            default_type application/json;
            return 200 '{{"status":"ok"}}';
        }}
    }}
}}
""")
    return Target("nginx", plain, tls, [NGINX, "-p", str(n), "-e", str(n / "error.log"),
                                        "-c", str(conf)], d)


def neurohttp_target(d: Path, cert: Path, key: Path, code: Path) -> Target:
    plain, tls = free_port(), free_port()
    conf = d / "neurohttp.toml"
    conf.write_text(f"""[server]
bind = ["127.0.0.1:{plain}"]
tls_bind = ["127.0.0.1:{tls}"]
workers = 2
pid_file = "{d / 'neurohttpd.pid'}"
[log]
level = "warning"
[tls]
cert_file = "{cert}"
key_file = "{key}"
""")
    env = dict(os.environ, PYTHONPATH=str(code))
    return Target("neurohttp", plain, tls, [sys.executable, "-m", "neurohttp", "start", "-c",
                                            str(conf)], d, env)


def run_wrk(target: Target, scheme: str, conn: str, duration: int, connections: int
            ) -> dict[str, Any]:
    port = target.tls_port if scheme == "tls" else target.plain_port
    url = f"{'https' if scheme == 'tls' else 'http'}://127.0.0.1:{port}/health"
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", LUA_REPORT, url]
    if conn == "close":
        cmd[1:1] = ["-H", "Connection: close"]
    pids = target.tree()
    cpu0 = cpu_by_pid(pids)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    cpu1 = cpu_by_pid(target.tree())
    m = re.search(r"^WRKJSON (\{.*\})$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {r.stderr.strip()[:300]} {r.stdout[-300:]}")
    d = json.loads(m.group(1))
    cpu = sum(t - cpu0.get(p, 0.0) for p, t in cpu1.items())
    errors = sum(v for k, v in d.items() if k.startswith("err_"))
    secs = d["duration_us"] / 1e6
    return {"rps": d["requests"] / secs, "us_per_req": 1e6 * cpu / max(d["requests"], 1),
            "errors": errors, "requests": d["requests"], "cmd": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa")
    ap.add_argument("--code", default=str(ROOT), help="the neurohttp checkout to run")
    ap.add_argument("--out-json", default="")
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    ca = trustme.CA(key_type=trustme.KeyType.RSA if args.key_type == "rsa"
                    else trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("127.0.0.1", "localhost",
                         key_type=trustme.KeyType.RSA if args.key_type == "rsa"
                         else trustme.KeyType.ECDSA)
    cert, key, ca_file = d / "cert.pem", d / "key.pem", d / "ca.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    targets = [nginx_target(d, cert, key), neurohttp_target(d, cert, key, Path(args.code))]
    results: list[dict[str, Any]] = []
    log(f"work dir {d}; {args.key_type} certificate; {args.rounds} rounds x "
        f"{len(targets) * len(CASES)} cases x {args.duration:g} s")
    try:
        for rnd in range(args.rounds):
            for t in (targets if rnd % 2 == 0 else targets[::-1]):
                t.start(ca_file)
                try:
                    for scheme, conn in CASES:
                        run_wrk(t, scheme, conn, args.warmup, args.connections)
                        r = run_wrk(t, scheme, conn, args.duration, args.connections)
                        r.update(round=rnd + 1, server=t.name, scheme=scheme, conn=conn)
                        results.append(r)
                        log(f"  {t.name:9} {scheme:5} {conn:10} {r['rps']:>9,.0f} req/s "
                            f"{r['us_per_req']:7.1f} us/req  errors {r['errors']}")
                finally:
                    t.stop()
    finally:
        for t in targets:
            t.stop()
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=1))
    print(report(results, args))


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def med(server: str, scheme: str, conn: str, key: str) -> float:
        xs = [r[key] for r in results
              if (r["server"], r["scheme"], r["conn"]) == (server, scheme, conn)]
        return statistics.median(xs) if xs else float("nan")

    out = [f"GET /health, wrk -t1 -c{args.connections}, {args.duration:g} s per case, "
           f"{args.rounds} round(s), medians; {args.key_type} certificate; 2 workers each",
           "", "| server | case | req/s | server CPU µs/req | TLS share µs/req |",
           "|---|---|---:|---:|---:|"]
    for server in ("nginx", "neurohttp"):
        for scheme, conn in CASES:
            us = med(server, scheme, conn, "us_per_req")
            share = us - med(server, "plain", conn, "us_per_req") if scheme == "tls" else None
            out.append(f"| {server} | {scheme} {conn} | {med(server, scheme, conn, 'rps'):,.0f} "
                       f"| {us:.1f} | {'' if share is None else f'{share:.1f}'} |")
    out += ["", "| TLS, ours / nginx's | CPU µs/req | TLS share | target (CPU µs/req ≤ 2×) |",
            "|---|---:|---:|---|"]
    for conn in ("keep-alive", "close"):
        ours, theirs = med("neurohttp", "tls", conn, "us_per_req"), med("nginx", "tls", conn,
                                                                        "us_per_req")
        share_ours = ours - med("neurohttp", "plain", conn, "us_per_req")
        share_theirs = theirs - med("nginx", "plain", conn, "us_per_req")
        ratio = ours / theirs
        out.append(f"| {conn} | {ratio:.2f} | {share_ours / share_theirs:.2f} "
                   f"| {'met' if ratio <= 2 else 'MISSED'} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
