"""The response cache against a paced model: latency of a miss (the echo model
generating at `token_delay_ms` per token) and of a hit (the kept answer), on a
real 1-worker server over one keep-alive connection.

    python loadtests/cache_bench.py [--n 200] [--delay-ms 5] [--words 20]

Each round sends a fresh prompt twice (a miss, then a hit) and a request to
the same model without the cache (temperature 0.5: not cacheable), and prints
the p50 / p90 of each in milliseconds. A benchmark, not a test: the numbers
depend on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server import Server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--delay-ms", type=float, default=5.0)
    ap.add_argument("--words", type=int, default=20, help="words in the model's answer")
    args = ap.parse_args()
    answer = " ".join(["word"] * (args.words - 1)) + " {prompt}"
    models = {"echo": {"provider": "echo"},
              "paced": {"provider": "echo", "token_delay_ms": args.delay_ms,
                        "response": answer, "cache_ttl_s": 3600}}
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp), workers=1, config={"models": models}).start()
        try:
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
            times: dict[str, list[float]] = {"miss": [], "hit": [], "uncached": []}

            def ask(prompt: str, temperature: float, expect: str | None) -> float:
                body = json.dumps({"model": "paced", "temperature": temperature,
                                   "messages": [{"role": "user", "content": prompt}]})
                t0 = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                dt = (time.perf_counter() - t0) * 1000
                got = r.getheader("x-neurohttp-cache")
                assert r.status == 200 and got == expect, (r.status, got, expect)
                return dt

            for i in range(args.n):
                times["miss"].append(ask(f"p{i}", 0, "miss"))
                times["hit"].append(ask(f"p{i}", 0, "hit"))
                times["uncached"].append(ask(f"p{i}", 0.5, None))
            print(f"paced echo: {args.words} words, {args.delay_ms:g} ms per token, "
                  f"{args.n} rounds, one keep-alive connection, 1 worker")
            for kind, ts in times.items():
                q = statistics.quantiles(ts, n=10)
                print(f"  {kind:9s} p50 {statistics.median(ts):8.3f} ms   p90 {q[8]:8.3f} ms")
            print("  /stats cache:", srv.stats()["cache"])
            conn.close()
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
