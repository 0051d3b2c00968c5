"""Cost of the candidates for an exact cross-worker counter, measured in one run.

    python loadtests/shm_primitives_bench.py [--n 200000] [--rounds 5] [--contended]

Instructions per operation, stable on a busy machine (user space only: a
system call's kernel work is not counted), for one candidate:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python \
        loadtests/shm_primitives_bench.py --rounds 1 --n 20000 --only "robust"
    (and --n 40000; the difference divided by 20000)

Each candidate does an add-and-read of one 64-bit word in shared memory (or
what the candidate offers for it) N times; the best of `rounds` interleaved
rounds is reported in ns per operation, beside the bare loop. Then the
operations built on the chosen primitive (neurohttp/shared/table.py) and,
with --contended, the chosen counter hammered by 2 processes at once (the
total is checked). The numbers and the choice are in docs/ARCHITECTURE.md,
"Shared state". The `atomics` and `posix_ipc` candidates run when those
packages are installed (`pip install atomics posix-ipc`; the server needs
neither).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import gc
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurohttp.shared import mutex  # noqa: E402
from neurohttp.stats import layout as L  # noqa: E402
from neurohttp.stats.block import StatsBlock  # noqa: E402


def candidates(buf: memoryview, n: int) -> dict[str, Callable[[], None]]:
    w = buf.cast("q")
    base = mutex.buffer_address(buf)
    out: dict[str, Callable[[], None]] = {}

    def bare() -> None:
        for _ in range(n):
            pass
    out["empty loop"] = bare

    def plain() -> None:
        for _ in range(n):
            w[1] += 1
            w[1]
    out["memoryview add+read, no lock (not exact)"] = plain

    lk = multiprocessing.get_context("fork").Lock()

    def semlock() -> None:
        acq, rel = lk.acquire, lk.release
        for _ in range(n):
            acq()
            w[2] += 1
            w[2]
            rel()
    out["multiprocessing.Lock (POSIX semaphore) + add"] = semlock

    try:
        import posix_ipc  # type: ignore[import-not-found,import-untyped,unused-ignore]
        sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=1)
        sem.unlink()

        def pipc() -> None:
            acq, rel = sem.acquire, sem.release
            for _ in range(n):
                acq()
                w[3] += 1
                w[3]
                rel()
        out["posix_ipc.Semaphore + add"] = pipc
    except ImportError:
        pass

    fd, path = tempfile.mkstemp(dir="/dev/shm")
    os.unlink(path)

    def flock() -> None:
        for _ in range(n):
            fcntl.flock(fd, fcntl.LOCK_EX)
            w[4] += 1
            w[4]
            fcntl.flock(fd, fcntl.LOCK_UN)
    out["fcntl.flock + add"] = flock

    maddr = base + 64
    mutex.init_mutex(maddr)
    trylock, unlock, lock_slow = mutex.trylock, mutex.unlock, mutex.lock_slow

    def robust() -> None:
        for _ in range(n):
            rc = trylock(maddr)
            if rc:
                lock_slow(maddr, rc)
            w[5] += 1
            w[5]
            unlock(maddr)
    out["robust pthread mutex (ctypes) + add  [chosen]"] = robust

    try:
        import atomics  # type: ignore[import-untyped,unused-ignore]
        ctx = atomics.atomicview(buffer=buf[256:264], atype=atomics.INT)
        a = ctx.__enter__()

        def at_add() -> None:
            fa = a.fetch_add
            for _ in range(n // 10):
                fa(1)
        out["atomics.fetch_add (public API; n/10 ops)"] = at_add

        def at_cas() -> None:
            ld, cx = a.load, a.cmpxchg_strong
            for _ in range(n // 10):
                v = ld()
                cx(v, v + 1)
        out["atomics load+cmpxchg (public API; n/10 ops)"] = at_cas

        from atomics._impl.patomic import Patomic  # type: ignore[import-untyped,unused-ignore]
        ops = Patomic.ops(8)
        fetch_add = ops.signed_ops.fp_fetch_add
        cas = ops.xchg_ops.fp_cmpxchg_strong
        addr = base + 320
        val, res = ctypes.c_int64(1), ctypes.c_int64(0)
        pv, pr = ctypes.byref(val), ctypes.byref(res)
        exp, des = ctypes.c_int64(0), ctypes.c_int64(0)
        pe, pd = ctypes.byref(exp), ctypes.byref(des)

        def raw_add() -> None:
            seen = 0
            for _ in range(n):
                fetch_add(addr, pv, 5, pr)
                seen = res.value
            assert seen >= 0
        out["atomics' libpatomic fetch_add via ctypes (internals)"] = raw_add

        def raw_cas() -> None:
            for _ in range(n):
                v = w[40]
                exp.value = v
                des.value = v + 1
                cas(addr, pe, pd, 5, 5)
        out["atomics' libpatomic load+CAS via ctypes (internals)"] = raw_cas
        out["_keep"] = lambda: None
        out["_ctx"] = ctx.__exit__  # type: ignore[assignment]
    except ImportError:
        pass
    return out


def table_ops(block: StatsBlock, n: int) -> dict[str, Callable[[], None]]:
    t = block.state.named
    now = time.time()

    def add() -> None:
        for _ in range(n):
            t.add("plugin:requests", 1)

    def admit() -> None:
        for i in range(n):
            t.admit("rpm:team-a", 1, 1e9, 10, now + i * 1e-6)

    def quota() -> None:
        for _ in range(n):
            t.quota("day:team-a", 1, 1 << 60, 86400, now)

    def new_keys() -> None:
        o = block.state.open
        for i in range(n):
            o.admit(f"ip:{i % 8000}", 1, 1e9, 10, now + i * 1e-6)

    return {"KeyTable.add (exact counter)": add,
            "KeyTable.admit (GCRA, one key)": admit,
            "KeyTable.quota (daily window)": quota,
            "KeyTable.admit over 8000 open keys": new_keys}


def best(fns: dict[str, Callable[[], None]], n: int, rounds: int, only: str = ""
         ) -> dict[str, float]:
    res = {k: float("inf") for k in fns if not k.startswith("_") and only in k}
    for _ in range(rounds):
        for k in res:
            gc.collect()
            t0 = time.perf_counter_ns()
            fns[k]()
            ops = n // 10 if "n/10" in k else n
            res[k] = min(res[k], (time.perf_counter_ns() - t0) / ops)
    return res


def _contend(name: str, n: int) -> None:
    blk = StatsBlock.attach(name)
    t = blk.state.named
    for _ in range(n):
        t.add("contended", 1)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contended", action="store_true", help="also 2 processes on one counter")
    ap.add_argument("--only", default="", help="only the candidates whose name has this text "
                    "(for callgrind: run --n N and --n 2N --rounds 1 and subtract)")
    args = ap.parse_args()
    buf = memoryview(bytearray(4096))
    geo = L.Geometry(routes=4, models=2, max_workers=1, named_keys=1024, open_keys=16384)
    block = StatsBlock.create(f"neurohttp-bench-{uuid.uuid4().hex[:12]}", geo)
    try:
        print(f"add-and-read of one shared word, best of {args.rounds} rounds, ns/op:")
        for k, v in best(candidates(buf, args.n), args.n, args.rounds, args.only).items():
            print(f"  {k:58s} {v:8.0f}")
        print("operations on the chosen primitive (neurohttp/shared/table.py), ns/op:")
        for k, v in best(table_ops(block, args.n), args.n, args.rounds, args.only).items():
            print(f"  {k:58s} {v:8.0f}")
        if args.contended:
            ctx = multiprocessing.get_context("fork")
            ps = [ctx.Process(target=_contend, args=(block.shm.name, args.n)) for _ in range(2)]
            t0 = time.perf_counter_ns()
            for p in ps:
                p.start()
            for p in ps:
                p.join()
            dt = time.perf_counter_ns() - t0
            got = block.state.named.get("contended")
            print(f"2 processes x {args.n} KeyTable.add on one key: {dt / (2 * args.n):.0f} ns/op "
                  f"wall, total {got} ({'exact' if got == 2 * args.n else 'WRONG'})")
    finally:
        gc.collect()
        block.unlink()


if __name__ == "__main__":
    main()
