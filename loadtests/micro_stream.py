"""Python cost of a streamed token through the real handler and generation
loop, with no sockets: POST /v1/chat/completions with "stream": true on an
echo model, its chunks read in-process.

    python loadtests/micro_stream.py [--tokens 100000] [--paced]

`--paced` uses an echo model paced at 1 µs (the async path: one asyncio
sleep per token); the default is the unpaced one (the ready path, 64 tokens
to a chunk). Prints ns per token. For instruction counts, run it under
callgrind with two --tokens values and divide the difference (PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurohttp import config  # noqa: E402
from neurohttp.messages import Request  # noqa: E402
from neurohttp.stats.block import StatsBlock  # noqa: E402
from neurohttp.stats.sizing import geometry_for  # noqa: E402
from neurohttp.worker.worker import Worker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--paced", action="store_true")
    ap.add_argument("--plugin", choices=("off", "empty"), default="off",
                    help="empty: a plugin with empty before_request, after_response and "
                         "on_token hooks (loadtests/plugins/empty_hooks.py)")
    args = ap.parse_args()
    model = {"provider": "echo", "repeat": True, "split": "token",
             "max_output_tokens": 1_000_000_000}
    if args.paced:
        model["token_delay_ms"] = 0.001
    doc: dict[str, Any] = {"models": {"echo": {"provider": "echo"}, "m": model}}
    if args.plugin == "empty":
        doc["plugins"] = {"paths": [str(Path(__file__).resolve().parent / "plugins")],
                          "enabled": ["empty_hooks"]}
    cfg = config.from_dict(doc)
    block = StatsBlock.create(f"neurohttp-microstream-{os.getpid()}", geometry_for(cfg))
    try:
        w: Any = Worker(cfg, block, block.reserve_slot(1, 1), 1, [], 0)
        w.build()  # plugins, models, services, routes (the worker's start does this)
        from neurohttp.ai import tokenizer
        tokenizer.preload()
        handler: Any = w.app.routes["/v1/chat/completions"]["POST"]
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hello"}],
                           "max_tokens": args.tokens, "stream": True}).encode()

        async def one() -> int:
            r: Any = handler(Request("POST", b"/v1/chat/completions", "1.1", [], "127.0.0.1",
                                True, body))
            if not hasattr(r, "chunks"):
                r = await r  # a stream primed before its head (a paced provider)
            n = 0
            async for chunk in r.chunks:
                n += len(chunk)
            if r.on_close is not None:
                r.on_close(False)
            return n

        async def run() -> None:
            best = float("inf")
            for _ in range(args.runs):
                t0 = time.perf_counter_ns()
                await one()
                best = min(best, (time.perf_counter_ns() - t0) / args.tokens)
            kind = "async path (paced at 1 µs)" if args.paced else "ready path"
            print(f"streamed token, {kind}: {best:,.0f} ns")

        asyncio.run(run())
        # the Worker holds views of the block, which cannot close under them
        handler = w = None  # noqa: F841
        gc.collect()
    finally:
        block.unlink()


if __name__ == "__main__":
    main()
