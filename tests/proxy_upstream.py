"""The fake upstream (tests/fake_upstream.py) with the endpoints the
openai_proxy tests need beside its own, kept apart so the two files change
independently:

    embeddings  an OpenAI embeddings answer: one vector per input (`dims`
                floats, default 8; element k of input i is i + k / 10), as
                floats or base64 float32 as the body's encoding_format asks,
                with usage; the "fake" echo of what was received.
    echo_request {"method", "path", "headers", "body_bytes", "sha256"} of the
                request (any body, read as it comes).

Chosen like the others: the x-fake header, or the JSON body's model
"fake:embeddings".
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

import fake_upstream as fu


def vector(i: int, dims: int) -> list[float]:
    return [i + k / 10 for k in range(dims)]


async def embeddings(c: fu.Conn, req: fu.Request, opts: dict[str, str]) -> None:
    doc = req.json if isinstance(req.json, dict) else {}
    inputs = doc.get("input", [])
    inputs = inputs if isinstance(inputs, list) else [inputs]
    dims = int(opts.get("dims", "8"))
    data = []
    for i, _ in enumerate(inputs):
        v: Any = vector(i, dims)
        if doc.get("encoding_format") == "base64":
            v = base64.b64encode(struct.pack(f"<{dims}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": v})
    out = {"object": "list", "data": data, "model": doc.get("model", "fake"),
           "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
           "fake": fu.echo(req)}
    await c.respond(200, json.dumps(out).encode())


async def echo(c: fu.Conn, req: fu.Request, opts: dict[str, str]) -> None:
    out = {"method": req.method, "path": req.path, "headers": req.headers,
           "body_bytes": len(req.body), "sha256": hashlib.sha256(req.body).hexdigest()}
    await c.respond(200, json.dumps(out).encode())


_dispatch = fu.dispatch


async def dispatch(c: fu.Conn, req: fu.Request, mode: str, opts: dict[str, str]) -> bool:
    if mode == "embeddings":
        await embeddings(c, req, opts)
        return True
    if mode == "echo_request":
        await echo(c, req, opts)
        return True
    return await _dispatch(c, req, mode, opts)


class ProxyUpstream(fu.FakeUpstream):
    script = __file__


if __name__ == "__main__":
    fu.dispatch = dispatch  # (handle() looks it up at each request)
    fu.main()
