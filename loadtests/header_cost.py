"""What six x-ratelimit-* headers cost a response head: given as a `headers`
dict (every field checked for CR/LF on every response) or as
`trusted_headers` bytes the code formats itself (Response.trusted_headers).
Both through the real H1Connection.respond, without sockets.

    python loadtests/header_cost.py --n N --way dict|trusted|none

Count instructions with callgrind (two runs, N = 1000 and 5000, difference
divided by 4000), as in docs/PERFORMANCE.md:

    for n in 1000 5000; do PYTHONHASHSEED=0 valgrind --tool=callgrind \\
      --callgrind-out-file=/tmp/hc.$n python3 loadtests/header_cost.py --n $n --way dict; done
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurohttp.messages import Request  # noqa: E402
from neurohttp.protocol.h1conn import H1Connection  # noqa: E402
from neurohttp.protocol.settings import ConnectionSettings  # noqa: E402

GET = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
LIMIT_REQUESTS, LIMIT_TOKENS = "60", "150000"  # (formatted once per key, as the gate does)


def as_dict(remaining: int, tokens: int) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": LIMIT_REQUESTS,
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": LIMIT_TOKENS,
            "x-ratelimit-remaining-tokens": str(tokens),
            "x-ratelimit-reset-tokens": "6ms"}


LIMITS = b"x-ratelimit-limit-requests: 60\r\nx-ratelimit-limit-tokens: 150000\r\n"  # once per key


def as_bytes(remaining: int, tokens: int) -> bytes:
    return b"%sx-ratelimit-remaining-requests: %d\r\nx-ratelimit-reset-requests: %s\r\n" \
        b"x-ratelimit-remaining-tokens: %d\r\nx-ratelimit-reset-tokens: %s\r\n" % (
            LIMITS, remaining, b"1s", tokens, b"6ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--way", choices=["dict", "trusted", "none"], default="dict")
    args = ap.parse_args()
    c: H1Connection[Request] = H1Connection(ConnectionSettings(), "127.0.0.1", Request, 0.0)
    [req] = c.receive(GET, 0.0)
    respond = c.respond
    out = 0
    if args.way == "dict":
        for i in range(args.n):
            out += len(respond(req, 200, "application/json", as_dict(i, i * 7), b"", 100, 1.0))
    elif args.way == "trusted":
        for i in range(args.n):
            out += len(respond(req, 200, "application/json", None, as_bytes(i, i * 7), 100, 1.0))
    else:
        for _ in range(args.n):
            out += len(respond(req, 200, "application/json", None, b"", 100, 1.0))
    print(f"{args.way}: {out // max(1, args.n)} bytes of head per response")


if __name__ == "__main__":
    main()
