"""An upstream's API key, passed by the caller in a header (or, for APIs that
take one, in the query string), never shows in an error's message, repr or
traceback, in a log record, or in the repr of the client's objects."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import traceback
from typing import Any

import pytest
import trustme
import uvloop
from fake_upstream import FakeUpstream

from neurohttp.upstream import (
    ErrorKind,
    HeaderBlock,
    PoolLimits,
    Timeouts,
    UpstreamClient,
    UpstreamError,
)

SECRET = "sk-proj-TOPSECRET-4f1c2e9a7b"
AUTH = HeaderBlock({"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json",
                    "api-key": SECRET})
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": SECRET}]}).encode()
TARGET = f"/v1/chat/completions?key={SECRET}"


def visible(obj: Any) -> str:
    """Everything an error or object shows to a log or a user."""
    out = [str(obj), repr(obj)]
    if isinstance(obj, BaseException):
        out.append("".join(traceback.format_exception(obj)))
        out.extend(map(str, obj.args))
    return "\n".join(out)


def test_the_key_never_shows_in_errors_reprs_or_logs(fake_upstream, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    ca = trustme.CA()  # a certificate nobody trusts: kind "tls"
    chain = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    tls_up = FakeUpstream(tmp_path / "tls", tls=(str(chain), str(chain))).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    seen: list[str] = []
    kinds: set[ErrorKind] = set()

    async def attempt(pool: Any, headers: HeaderBlock, **kw: Any) -> None:
        try:
            r = await pool.request("POST", TARGET, headers=headers, body=BODY, **kw)
            seen.append(visible(r))
            await r.read()
            r.raise_for_status()
        except UpstreamError as e:
            kinds.add(e.kind)
            seen.append(visible(e))

    async def main() -> None:
        client = UpstreamClient()
        up = client.pool(fake_upstream.url, limits=PoolLimits(max_connections=1),
                         timeouts=Timeouts(first_byte=0.3, pool=0.2))
        await attempt(client.pool(dead), AUTH)                                       # connect
        await attempt(client.pool(tls_up.url), AUTH)                                 # tls
        await attempt(up, AUTH + HeaderBlock({"x-fake": "garbage"}))                 # protocol
        await attempt(up, AUTH + HeaderBlock({"x-fake": "hang"}))                    # first byte
        await attempt(up, AUTH + HeaderBlock({"x-fake": "status;code=401"}))         # status
        await attempt(up, AUTH + HeaderBlock({"x-fake": "close"}))                   # closed
        await attempt(up, AUTH + HeaderBlock({"x-fake": "close_mid_stream"}))        # mid-response
        hanging = asyncio.ensure_future(
            up.request("POST", TARGET, headers=AUTH + HeaderBlock({"x-fake": "hang"}), body=BODY,
                       timeouts=Timeouts(first_byte=5)))
        await asyncio.sleep(0.1)
        await attempt(up, AUTH)                                                      # pool
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)
        seen.extend([visible(up), visible(AUTH), json.dumps(client.stats())])
        for bad in ({"Authorization": f"Bearer {SECRET}\r\nX-Evil: 1"},
                    {"Authorization": f"Bearer {SECRET}\u2603"}):
            with pytest.raises(ValueError) as e:
                await up.request("POST", "/", headers=bad, body=b"")
            seen.append(visible(e.value))
        with pytest.raises(ValueError) as e:
            client.pool(f"https://user:{SECRET}@example.com/")
        seen.append(visible(e.value))

    try:
        uvloop.run(asyncio.wait_for(main(), 30))
    finally:
        tls_up.stop()
    assert kinds == {ErrorKind.CONNECT, ErrorKind.TLS, ErrorKind.PROTOCOL, ErrorKind.STATUS,
                     ErrorKind.FIRST_BYTE_TIMEOUT, ErrorKind.CLOSED,
                     ErrorKind.CLOSED_MID_RESPONSE, ErrorKind.POOL_TIMEOUT}
    text = "\n".join(seen) + "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert SECRET not in text
    assert "TOPSECRET" not in text
