"""A raw ASGI app that serves the same SSE stream as NeuroHTTP's
/v1/chat/completions with the echo model (repeat, split = "token"): the same
events byte for byte apart from the id and timestamp. stream_bench.py runs it
under uvicorn as the peer.

    uvicorn loadtests.asgi_stream:app --workers 2 --loop uvloop --http httptools

Model "paced" sleeps before every token after the first (the same rule as the
echo model's token_delay_ms): ASGI_STREAM_DELAY_MS milliseconds (default 20),
which stream_bench.py sets from its --delay-ms so both servers pace alike. Any
other model does not sleep.
"""

from __future__ import annotations

import asyncio
import os
import time

import orjson

# "Hello, AI world!" then " Hello, AI world!" again and again, as cl100k tokens
FIRST = ["Hello", ",", " AI", " world", "!"]
UNIT = [" Hello", ",", " AI", " world", "!"]
PACED_DELAY = float(os.environ.get("ASGI_STREAM_DELAY_MS", "20")) / 1000
HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]


def token(i: int) -> str:
    return FIRST[i] if i < 5 else UNIT[i % 5]


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    req = orjson.loads(body)
    n = int(req.get("max_tokens") or 16)
    delay = PACED_DELAY if req.get("model") == "paced" else 0.0
    head = {"id": "chatcmpl-" + os.urandom(12).hex(), "object": "chat.completion.chunk",
            "created": int(time.time()), "model": req.get("model"), "system_fingerprint": None}

    def event(obj: dict) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    first = event(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]})
    pre = first[:first.index(b'"choices":')] + b'"choices":[{"index":0,"delta":{"content":'
    post = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    gone = asyncio.Event()

    async def watch() -> None:
        # uvicorn's send() does not fail once the client has gone: listen for it
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        dumps = orjson.dumps
        for i in range(n):
            if delay and i:
                await asyncio.sleep(delay)
            elif i and not i % 256:
                await asyncio.sleep(0)  # as the echo model does: let the loop run
            if gone.is_set():
                return
            await send({"type": "http.response.body", "body": pre + dumps(token(i)) + post,
                        "more_body": True})
    finally:
        watcher.cancel()
    last = event(head | {"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": "length"}]})
    await send({"type": "http.response.body", "body": last + b"data: [DONE]\n\n",
                "more_body": False})
