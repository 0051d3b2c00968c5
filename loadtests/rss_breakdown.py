"""Where a worker's RSS comes from: resident memory after each import a worker
needs, in a fresh interpreter, then after loading the tokenizer's tables.

    python loadtests/rss_breakdown.py

Each step runs in its own fresh `python -c` so the numbers are what a process
that stops there holds (RSS: every resident page it maps, shared or not).
A worker forked from the master maps all of these pages; they are shared
copy-on-write with the master and the other workers, which PSS accounts for
and RSS does not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEPS = [
    ("python, bare", ""),
    ("+ asyncio (imports ssl: libssl, libcrypto)", "import asyncio"),
    ("+ uvloop", "import uvloop"),
    ("+ httptools, orjson", "import httptools, orjson"),
    ("+ psutil, setproctitle, wsproto", "import psutil, setproctitle, wsproto"),
    ("+ neurohttp's worker, master and handlers",
     "import neurohttp.worker.worker, neurohttp.master.arbiter, neurohttp.handlers.chat, "
     "neurohttp.handlers.openai, neurohttp.handlers.ws, neurohttp.handlers.metrics"),
    ("+ click, rich (the CLI; the master runs it before forking)", "import neurohttp.cli, rich"),
    ("+ tiktoken cl100k_base tables (tokenizer.preload)",
     "from neurohttp.ai import tokenizer; tokenizer.preload()"),
]

PROBE = """
import sys
sys.path.insert(0, {root!r})
{code}
for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
        print(line.split()[1])
"""


def rss_after(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), code=code)],
                         capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1])


def main() -> None:
    code = []
    last = 0
    print("| step | RSS MiB | added MiB |")
    print("|---|---:|---:|")
    for label, stmt in STEPS:
        if stmt:
            code.append(stmt)
        kib = min(rss_after("\n".join(code)) for _ in range(3))
        print(f"| {label} | {kib / 1024:.1f} | {(kib - last) / 1024:+.1f} |")
        last = kib


if __name__ == "__main__":
    main()
