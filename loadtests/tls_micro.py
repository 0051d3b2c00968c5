"""What TLS adds to a keep-alive request, in instructions: the real worker
code (HttpConnection, the uvloop server, the TLS context of tlsconfig.py)
serves in this process; a client in a subprocess (which valgrind does not
trace) sends N sequential keep-alive requests over one connection.

    for m in plain tls; do for n in 500 2500; do PYTHONHASHSEED=0 valgrind \\
      --tool=callgrind --callgrind-out-file=/tmp/cg.$m.$n python3.11 \\
      loadtests/tls_micro.py --mode $m --n $n; done; done
    # instructions/request = (summary of cg.M.2500 - summary of cg.M.500) / 2000

Without valgrind it prints the server's CPU time per request (noisy; the
instruction counts are what to compare).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme  # noqa: E402

from neurohttp import config, tlsconfig  # noqa: E402
from neurohttp.stats.block import StatsBlock  # noqa: E402
from neurohttp.stats.sizing import geometry_for  # noqa: E402
from neurohttp.worker.connection import HttpConnection  # noqa: E402
from neurohttp.worker.worker import Worker, new_event_loop  # noqa: E402

CLIENT = r"""
import http.client, socket, ssl, sys
port, ca, n, warm = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sock = socket.create_connection(("127.0.0.1", port), timeout=60)
if ca:
    sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname="127.0.0.1")
req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
for _ in range(warm + n):
    sock.sendall(req)
    r = http.client.HTTPResponse(sock)
    r.begin()
    assert r.status == 200 and r.read()
sock.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("plain", "tls"), default="tls")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--warm", type=int, default=50)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="tls-micro-"))
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    chain, ca_file = d / "chain.pem", d / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(ca_file))
    conf = d / "n.toml"
    conf.write_text(f'[server]\ntls_bind = ["127.0.0.1:0"]\n[tls]\ncert_file = "{chain}"\n')
    cfg = config.load(str(conf))
    tls = tlsconfig.load(cfg)
    assert tls is not None
    ctx = tls.context if args.mode == "tls" else None
    # As the master does before forking; it also leaves glibc's malloc with a
    # raised mmap threshold, which uvloop's 256 KiB TLS read buffer depends on
    # (docs/SECURITY.md, "What TLS costs").
    from neurohttp.ai import tokenizer
    tokenizer.preload()
    block = StatsBlock.create(f"neurohttp-tlsmicro-{os.getpid()}", geometry_for(cfg))
    try:
        w = Worker(cfg, block, block.reserve_slot(1, 1), 1, [], 0)
        w.build()  # plugins, models, services, routes (the worker's start does this)
        loop = w.loop = new_event_loop("auto")
        gc.collect()
        gc.freeze()   # as the master does before forking
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        async def serve() -> None:
            server = await loop.create_server(lambda: HttpConnection(w.conn_settings, w), sock=sock,
                                              **tlsconfig.server_kwargs(ctx, 10.0))
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, str(port), str(ca_file) if ctx else "",
                str(args.n), str(args.warm))
            before = resource.getrusage(resource.RUSAGE_SELF)
            code = await client.wait()
            after = resource.getrusage(resource.RUSAGE_SELF)
            assert code == 0, code
            server.close()
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            n = args.n + args.warm
            print(f"{args.mode}: {n} requests, server CPU {1e6 * cpu / n:.1f} µs/request, "
                  f"{(after.ru_minflt - before.ru_minflt) / n:.2f} page faults/request")

        loop.run_until_complete(serve())
        loop.close()
    finally:
        block.unlink()
        subprocess.run(["rm", "-rf", str(d)], check=False)


if __name__ == "__main__":
    main()
