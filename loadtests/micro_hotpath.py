"""Python cost of one keep-alive request through the real connection code, with no
sockets: a fake transport records writes. This isolates what our code costs
(parser callbacks, routing, handler, serialisation, stats) from the kernel.

    python loadtests/micro_hotpath.py [--n 200000]

Prints ns per request (best of 5 runs) for GET /health and POST /v1/chat.
Used to compare hot-path changes; end-to-end numbers come from bench.py.

`--auth header` sends the key with [auth] off (the baseline: the same bytes
parsed, nothing checked). `--auth key` runs the same requests with [auth] on and an API key sent in
Authorization (no limits: the key check and the key's figures); `--auth quota`
gives that key rpm, tpm and daily limits too (shared memory, never reached).
`--plugin limiter` loads plugins/limiter.py keyed by the client address (rpm
never reached); `--plugin empty` a plugin with empty before_request,
after_response and on_token hooks (loadtests/plugins/empty_hooks.py), `--plugin
hooks` one with the two request hooks only (empty_request_hooks.py).
`--firewall rules` runs them through a [firewall] with allow/deny networks,
trusted proxies, user-agent and path rules (none refusing them); `--firewall
rate` adds rps_per_ip (never reached); `--ua` sends a User-Agent header.
`--cache off|hit|miss` sends the chat requests with "temperature": 0 to an
echo model without the response cache (off), with it (every request after the
first a hit), or with a ttl so short that every request misses (and is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurohttp import config  # noqa: E402
from neurohttp.stats.block import StatsBlock  # noqa: E402
from neurohttp.stats.sizing import geometry_for  # noqa: E402
from neurohttp.worker.connection import HttpConnection  # noqa: E402
from neurohttp.worker.worker import Worker  # noqa: E402


class FakeTransport:
    def __init__(self) -> None:
        self.out = 0

    def write(self, data: bytes) -> None:
        self.out += len(data)

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 5555) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


REQUESTS = {
    "GET /health": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    "POST /v1/chat": (b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                      b"Content-Length: 18\r\nContent-Type: application/json\r\n\r\n"
                      b'{"prompt":"Hello"}'),
    "POST /v1/chat/completions": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                                  b"Content-Length: 63\r\nContent-Type: application/json\r\n\r\n"
                                  b'{"model":"echo","messages":[{"role":"user","content":"Hello"}]}'),
}


KEY = b"nh-bench-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="", help="run one request kind, e.g. 'GET /health'")
    ap.add_argument("--auth", choices=("off", "header", "key", "quota"), default="off",
                    help="[auth] off, off but the Authorization header sent, on with an "
                         "unlimited key, or with rpm/tpm/daily limits")
    ap.add_argument("--firewall", choices=("off", "rules", "rate"), default="off",
                    help="[firewall] empty, with address/agent/path rules (none refusing "
                         "these requests), or with those and rps_per_ip (never reached)")
    ap.add_argument("--ua", action="store_true", help="send a User-Agent header")
    ap.add_argument("--cache", choices=("", "off", "hit", "miss"), default="",
                    help="chat requests at temperature 0 to an echo model without the "
                         "response cache, with it (hits), or with a ttl that makes them misses")
    ap.add_argument("--plugin", choices=("off", "limiter", "hooks", "empty"), default="off",
                    help="limiter: plugins/limiter.py keyed by IP (rpm never reached); "
                         "hooks: a plugin with empty before_request and after_response hooks; "
                         "empty: those and an empty on_token (loadtests/plugins/)")
    args = ap.parse_args()
    requests = REQUESTS
    if args.cache:
        requests = {
            "GET /health": REQUESTS["GET /health"],
            "POST /v1/chat": (b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                              b"Content-Length: 34\r\nContent-Type: application/json\r\n\r\n"
                              b'{"prompt":"Hello","temperature":0}'),
            "POST /v1/chat/completions": (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                b"Content-Length: 79\r\nContent-Type: application/json\r\n\r\n"
                b'{"model":"echo","messages":[{"role":"user","content":"Hello"}],"temperature":0}')}
    if args.ua:
        requests = {name: raw.replace(b"\r\nHost:", b"\r\nUser-Agent: python-httpx/0.27.0"
                                      b"\r\nHost:", 1) for name, raw in requests.items()}
    if args.firewall != "off":
        rules = {"allow": ["127.0.0.0/8"], "deny": ["10.0.0.0/8", "192.0.2.0/24"],
                 "max_connections_per_ip": 100, "trusted_proxies": ["10.0.0.0/8"],
                 "deny_user_agents": ["nmap", "sqlmap", "nikto"],
                 "deny_paths": ["/.env", "/admin", "/wp-login.php"]}
        if args.firewall == "rate":
            rules["rps_per_ip"] = 10**6
        cfg = config.from_dict({"firewall": rules})
    elif args.cache:
        ttl = {"off": 0, "hit": 3600, "miss": 1e-6}[args.cache]
        cfg = config.from_dict({"models": {"echo": {"provider": "echo", "cache_ttl_s": ttl}}})
    elif args.plugin != "off":
        here = Path(__file__).resolve().parent
        cfg = config.from_dict({"plugins": {
            "paths": [str(here.parent / "plugins"), str(here / "plugins")],
            "enabled": [{"limiter": "limiter", "hooks": "empty_request_hooks",
                         "empty": "empty_hooks"}[args.plugin]],
            **({"limiter": {"rpm": 10**9}} if args.plugin == "limiter" else {})}})
    elif args.auth in ("off", "header"):
        cfg = config.load(None)
    else:
        limits = {"rpm": 10**9, "tpm": 10**12, "daily_tokens": 10**15} \
            if args.auth == "quota" else {}
        cfg = config.from_dict({"auth": {"enabled": True, "keys": [
            {"name": "bench", "sha256": hashlib.sha256(KEY).hexdigest(), **limits}]}})
    if args.auth != "off":
        requests = {name: raw.replace(b"\r\nHost:", b"\r\nAuthorization: Bearer " + KEY
                                      + b"\r\nHost:", 1) for name, raw in requests.items()}
    block = StatsBlock.create(f"neurohttp-microbench-{os.getpid()}", geometry_for(cfg))
    try:
        idx = block.reserve_slot(1, 1)
        w = Worker(cfg, block, idx, 1, [], 0)
        w.build()  # plugins, models, services, routes (the worker's start does this)
        w.loop = asyncio.new_event_loop()
        from neurohttp.ai import tokenizer
        tokenizer.preload()
        for name, raw in requests.items():
            if args.only and name != args.only:
                continue
            conn = HttpConnection(w.conn_settings, w)
            t = FakeTransport()
            conn.connection_made(t)
            best = float("inf")
            for _ in range(args.runs):
                t0 = time.perf_counter_ns()
                for _ in range(args.n):
                    conn.data_received(raw)
                best = min(best, (time.perf_counter_ns() - t0) / args.n)
            print(f"{name:16s} {best:7.0f} ns/request  ({t.out // max(1, args.runs * args.n)} bytes out)")
    finally:
        del conn
        block.unlink()


if __name__ == "__main__":
    main()
