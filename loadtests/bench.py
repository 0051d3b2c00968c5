"""The core benchmark: neurohttpd beside nginx and uvicorn under the same wrk load.

Runs ../shared/bench/peers.sh (which installs wrk, nginx and a venv with
uvicorn + uvloop + httptools serving a raw ASGI app), adding neurohttpd with
2 workers as one or more targets, then checks the issue's targets against the
medians of the same run:

  - server CPU per request at most 2x nginx's, on every scenario;
  - req/s at least 2x uvicorn's;
  - p99 no worse than uvicorn's;
  - RSS at most 30 MiB per worker (reported as RSS and PSS: the workers share
    the tokenizer's tables copy-on-write with the master).

    python loadtests/bench.py                       # 3 rounds of A and B, 10 s each
    python loadtests/bench.py --rounds 1 --duration 5
    python loadtests/bench.py --variants plain,accesslog,scrape --out-md /tmp/bench.md

Variants (each is one more neurohttpd target in the same run):
  plain      embedded defaults (access log off)
  accesslog  access log on, to a file
  scrape     plain, with /metrics scraped once a second during the run
  floor      not neurohttp: loadtests/floor_server.py, uvloop + httptools
             answering a fixed body (the least such a server costs), held to
             the same targets
  base       plain, but the code of another checkout (--base DIR, e.g. a git
             worktree of an older commit): before and after in the same run

    git worktree add /tmp/nh-base <commit>
    python loadtests/bench.py --variants base,plain --base /tmp/nh-base
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (CI, /work/main); worktrees elsewhere use /work/shared
SHARED_BENCH = next((p for p in (ROOT.parent / "shared" / "bench", Path("/work/shared/bench"))
                     if p.exists()), ROOT.parent / "shared" / "bench")
VARIANT_PORTS = {"plain": 8300, "accesslog": 8310, "scrape": 8320, "floor": 8330,
                 "base": 8340}


def peer_name(variant: str) -> str:
    return "floor" if variant == "floor" else f"neurohttp-{variant}"


def target_cmd(variant: str, workdir: Path, workers: int, base: Path | None = None) -> str:
    if variant == "floor":  # not neurohttp: the bare uvloop + httptools server
        return (f"exec {sys.executable} {ROOT / 'loadtests' / 'floor_server.py'} "
                f"--port {{port}} --workers {workers}")
    conf = workdir / f"{variant}.toml"
    lines = ["[log]", 'level = "warning"']
    if variant == "accesslog":
        lines.append(f'access_log = "{workdir / "access.log"}"')
    conf.write_text("\n".join(lines) + "\n")
    code = base if variant == "base" and base is not None else ROOT
    return (f"cd {workdir} && PYTHONPATH={code} exec {sys.executable} -m neurohttp start "
            f"-c {conf} -b 127.0.0.1:{{port}} -w {workers} --pid-file {workdir / variant}.pid")


def scraper(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """GET /metrics once a second while the scrape variant's server is up."""
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                r.read()
                counts["ok"] += 1
        except OSError:
            counts["down"] += 1


def med(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def check_targets(results: list[dict], variants: list[str], scenarios: list[str],
                  workers: int) -> list[str]:
    out = ["| scenario | variant | CPU µs/req (x nginx) | req/s (x uvicorn) | p99 ms (uvicorn) "
           "| RSS MiB per process (PSS) | targets |", "|---|---|---:|---:|---:|---:|---|"]

    def pick(peer: str, scn: str, key: str) -> float:
        return med([r[key] for r in results if r.get("peer") == peer
                    and r.get("scenario") == scn and key in r])

    for scn in scenarios:
        ng_cpu = pick("nginx", scn, "srv_us_per_req")
        uv_rps = pick("uvicorn", scn, "rps")
        uv_p99 = pick("uvicorn", scn, "p99_ms")
        for v in variants:
            name = peer_name(v)
            cpu, rps, p99 = (pick(name, scn, k) for k in ("srv_us_per_req", "rps", "p99_ms"))
            rss = pick(name, scn, "rss_mib") / (workers + 1)
            pss = pick(name, scn, "pss_mib") / (workers + 1)
            ok = []
            ok.append("CPU ok" if cpu <= 2 * ng_cpu else "CPU MISSED")
            ok.append("req/s ok" if rps >= 2 * uv_rps else "req/s MISSED")
            ok.append("p99 ok" if p99 <= uv_p99 else "p99 MISSED")
            ok.append("RSS ok" if rss <= 30 else ("RSS MISSED (PSS ok)" if pss <= 30 else "RSS MISSED"))
            out.append(f"| {scn} | {v} | {cpu:.1f} ({cpu / ng_cpu:.2f}x) | {rps:,.0f} "
                       f"({rps / uv_rps:.2f}x) | {p99:.2f} ({uv_p99:.2f}) | {rss:.0f} ({pss:.0f}) "
                       f"| {', '.join(ok)} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--scenarios", default="A,B")
    ap.add_argument("--variants", default="plain")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-md", default="")
    ap.add_argument("--base", default="", help="checkout whose code the 'base' variant runs")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANT_PORTS:
            ap.error(f"unknown variant {v!r} (known: {', '.join(VARIANT_PORTS)})")
    if "base" in variants and not args.base:
        ap.error("the base variant needs --base DIR")
    base = Path(args.base).resolve() if args.base else None
    workdir = Path(tempfile.mkdtemp(prefix="neurohttp-bench-"))
    rundir = workdir / "run"
    cmd = ["bash", str(SHARED_BENCH / "peers.sh"), "--only", "uvicorn",
           "--rounds", str(args.rounds), "--duration", str(args.duration),
           "--scenarios", args.scenarios, "--rundir", str(rundir)]
    for v in variants:
        cmd += ["--target", f"{peer_name(v)}={target_cmd(v, workdir, args.workers, base)}",
                "--port", str(VARIANT_PORTS[v])]
    md = args.out_md or str(workdir / "peers.md")
    cmd += ["--out-md", md]
    stop = threading.Event()
    counts = {"ok": 0, "down": 0}
    if "scrape" in variants:
        threading.Thread(target=scraper, args=(VARIANT_PORTS["scrape"], stop, counts),
                         daemon=True).start()
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    code = subprocess.call(cmd)
    stop.set()
    if code != 0:
        print(f"peers.sh failed ({code})", file=sys.stderr)
        return code
    results_file = sorted(glob.glob(str(rundir / "results-*.json")))[-1]
    results = json.loads(Path(results_file).read_text())["results"]
    summary = check_targets(results, variants, [s.strip() for s in args.scenarios.split(",")],
                            args.workers)
    extra = ["", f"Targets (medians of this run, {time.monotonic() - t0:.0f} s):", ""] + summary
    if "scrape" in variants:
        extra += ["", f"/metrics scrapes during the run: {counts['ok']} answered "
                      f"(the scrape variant's server is only up during its own turn)."]
    text = "\n".join(extra) + "\n"
    print(text)
    with open(md, "a") as f:
        f.write(text)
    print(f"report: {md}", file=sys.stderr)
    if not args.out_md:
        shutil.copy(md, Path(tempfile.gettempdir()) / "neurohttp-bench-latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
