"""The upstream HTTP/1.1 client of the gateway (providers, router, plugins).

    client = UpstreamClient()                       # one per worker
    pool = client.pool("https://api.openai.com/v1", limits=PoolLimits(max_connections=64),
                       timeouts=Timeouts(connect=3, first_byte=60, idle=30))
    auth = HeaderBlock({"Authorization": f"Bearer {key}",
                        "Content-Type": "application/json"})   # checked once
    async with await pool.request("POST", "/v1/chat/completions",
                                  headers=auth, body=payload) as resp:
        if resp.status != 200: ...                  # resp.raise_for_status()
        async for event in resp.sse():              # or: await resp.json(), async for chunk in resp
            ...

Layers: h1_client (sans-IO HTTP/1.1), sse (sans-IO event splitter),
connection (asyncio Protocol, deadlines, flow control), response (what the
consumer reads), pool (bound, reuse, waiting, stale retry), client (pools by
origin). docs/ARCHITECTURE.md, "Upstream client", has the rules.
"""

from .client import UpstreamClient
from .errors import NOT_SENT, TIMEOUTS, ErrorKind, UpstreamError
from .h1_client import HeaderBlock
from .origin import Origin, split_url
from .pool import Pool
from .response import Response
from .settings import PoolLimits, Timeouts, tls_context
from .sse import SSEDecoder, SSEEvent, sse_batches, sse_events

__all__ = ["NOT_SENT", "TIMEOUTS", "ErrorKind", "HeaderBlock", "Origin", "Pool", "PoolLimits",
           "Response", "SSEDecoder", "SSEEvent", "Timeouts", "UpstreamClient", "UpstreamError",
           "split_url", "sse_batches", "sse_events", "tls_context"]
