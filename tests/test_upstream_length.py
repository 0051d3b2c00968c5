"""A streamed request body with a declared Content-Length (upstream/h1_client.py
BodyFramer; Pool.request(..., body=iterator, length=N)): the framing unit
tests, then real exchanges with the fake upstream (tests/fake_upstream.py)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
import uvloop

from neurohttp.protocol.serialize import LAST_CHUNK
from neurohttp.upstream import HeaderBlock, UpstreamClient
from neurohttp.upstream.h1_client import BodyFramer

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        await asyncio.sleep(0)
        yield p


# ---------------------------------------------------------------- sans-IO
def test_chunked_framing_without_a_length():
    f = BodyFramer(None)
    assert f.piece(b"hello") == b"5\r\nhello\r\n"
    assert f.end() == LAST_CHUNK


def test_a_declared_length_sends_raw_pieces_and_holds_the_body_to_it():
    f = BodyFramer(10)
    assert f.piece(b"hello") == b"hello" and f.piece(b"world") == b"world"
    assert f.end() == b""
    over = BodyFramer(4)
    with pytest.raises(ValueError, match="over its Content-Length"):
        over.piece(b"hello")
    short = BodyFramer(6)
    short.piece(b"abc")
    with pytest.raises(ValueError, match="ended at 3 of"):
        short.end()


# ---------------------------------------------------------------- over a socket
SINK = HeaderBlock({"x-fake": "sink"})


def test_a_streamed_body_with_a_length_goes_with_content_length(fake_upstream):
    async def main() -> Any:
        pool = UpstreamClient().pool(fake_upstream.url)
        r = await pool.request("POST", "/v1/files", headers=SINK,
                               body=pieces(b"a" * 70000, b"b" * 30000), length=100000)
        return await r.json()

    doc = run(main())
    want = hashlib.sha256(b"a" * 70000 + b"b" * 30000).hexdigest()
    assert doc == {"received": 100000, "sha256": want}
    headers = fake_upstream.state()["log"][-1]["headers"]
    assert headers["content-length"] == "100000" and "transfer-encoding" not in headers


@pytest.mark.parametrize("parts, length", [((b"abc", b"def"), 4), ((b"abc",), 6)])
def test_a_body_not_matching_its_length_fails_and_closes_the_connection(fake_upstream,
                                                                      parts, length):
    async def main() -> None:
        pool = UpstreamClient().pool(fake_upstream.url)
        with pytest.raises(ValueError):
            await pool.request("POST", "/v1/files", headers=SINK, body=pieces(*parts),
                               length=length)
        assert pool.stats()["open"] == 0  # never reused: the upstream saw a cut request

    run(main())
    fake_upstream.wait_for(lambda s: s["connections_open"] == 0)
