"""Cost of one API-key admission (rpm + tpm + daily checked and charged), shared
memory vs Redis, in one run:

    python loadtests/quota_bench.py --url redis://127.0.0.1:6379/0 [--n 5000] [--runs 5]

Prints, per backend, CPU µs and wall µs per admission (best of `runs`), and
for Redis the client's share (redis-py + hiredis on the worker's loop) beside
the round trip. Instructions per admission, stable on a busy machine:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python \\
        loadtests/quota_bench.py --url ... --runs 1 --n 1000 --only redis
    (and --n 3000; the difference divided by 2000)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurohttp.shared.keylimits import KeyLimits  # noqa: E402
from neurohttp.stats import layout as L  # noqa: E402
from neurohttp.stats.block import StatsBlock  # noqa: E402

LIMITS = KeyLimits("bench", rpm=10**9, tpm=10**12, daily=10**15)


def shm(n: int, runs: int) -> tuple[float, float]:
    geo = L.Geometry(routes=4, models=2, max_workers=1, named_keys=4096, open_keys=64)
    blk = StatsBlock.create(f"neurohttp-quota-bench-{os.getpid()}", geo)
    try:
        table = blk.state.named
        best_cpu = best_wall = float("inf")
        for _ in range(runs):
            c, w = time.process_time_ns(), time.perf_counter_ns()
            for _ in range(n):
                table.key_admit(LIMITS)
            best_cpu = min(best_cpu, (time.process_time_ns() - c) / n / 1000)
            best_wall = min(best_wall, (time.perf_counter_ns() - w) / n / 1000)
        del table
        return best_cpu, best_wall
    finally:
        gc.collect()
        blk.unlink()


def redis(url: str, n: int, runs: int) -> tuple[float, float]:
    from neurohttp.shared.redis_store import RedisStore, connect

    async def main() -> tuple[float, float]:
        client = connect(url, 1.0)
        store = RedisStore(client, prefix=f"bench-{os.getpid()}:")
        for _ in range(100):
            await store.key_admit(LIMITS)
        best_cpu = best_wall = float("inf")
        for _ in range(runs):
            c, w = time.process_time_ns(), time.perf_counter_ns()
            for _ in range(n):
                await store.key_admit(LIMITS)
            best_cpu = min(best_cpu, (time.process_time_ns() - c) / n / 1000)
            best_wall = min(best_wall, (time.perf_counter_ns() - w) / n / 1000)
        await client.aclose()
        return best_cpu, best_wall

    import uvloop
    return uvloop.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=("shm", "redis"), default=None)
    args = ap.parse_args()
    if args.only != "redis":
        cpu, wall = shm(args.n, args.runs)
        print(f"shm    {cpu:8.2f} µs CPU  {wall:8.2f} µs wall per admission")
    if args.only != "shm":
        cpu, wall = redis(args.url, args.n, args.runs)
        print(f"redis  {cpu:8.2f} µs CPU (client)  {wall:8.2f} µs wall (round trip) per admission")


if __name__ == "__main__":
    main()
