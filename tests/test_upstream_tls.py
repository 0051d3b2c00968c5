"""https:// upstreams: real TLS against the fake upstream with certificates from
a throwaway CA (trustme). Certificates and host names are checked by default;
a CA file makes a private upstream trusted; SNI and ALPN http/1.1 are sent."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
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

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
JSON = HeaderBlock({"Content-Type": "application/json"})


def run(coro: Any, timeout: float = 30.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


def issue(tmp_path: Path, *names: str) -> tuple[str, str]:
    """A new CA and a certificate for `names`: (CA file, cert+key file)."""
    ca = trustme.CA()
    cert = ca.issue_cert(*names)
    ca_file, chain = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    return str(ca_file), str(chain)


@pytest.fixture
def tls_upstream(tmp_path):
    ca_file, chain = issue(tmp_path, "localhost", "127.0.0.1")
    up = FakeUpstream(tmp_path / "up", tls=(chain, chain)).start()
    up.ca_file = ca_file
    yield up
    up.stop()


def test_a_certificate_from_the_ca_file_is_accepted_with_sni_and_alpn(tls_upstream):
    async def main() -> tuple[list[int], dict[str, Any]]:
        pool = UpstreamClient().pool(f"https://localhost:{tls_upstream.port}",
                                     ca_file=tls_upstream.ca_file)
        statuses = []
        for _ in range(2):
            r = await pool.request("POST", "/v1/chat/completions", headers=JSON, body=BODY)
            assert (await r.json())["fake"]["headers"]["host"] == f"localhost:{tls_upstream.port}"
            statuses.append(r.status)
        return statuses, pool.stats()

    statuses, stats = run(main())
    assert statuses == [200, 200] and stats["connects"] == 1 and stats["reuses"] == 1
    st = tls_upstream.state()
    assert st["sni"] == "localhost" and st["alpn"] == "http/1.1"


def test_an_ip_address_certificate_is_checked_too(tls_upstream):
    async def main() -> int:
        r = await UpstreamClient().pool(tls_upstream.url, ca_file=tls_upstream.ca_file) \
            .request("POST", "/x", headers=JSON, body=BODY)
        await r.read()
        return r.status

    assert run(main()) == 200


def test_an_untrusted_certificate_fails_with_kind_tls(tls_upstream):
    async def main() -> tuple[UpstreamError, dict[str, Any]]:
        pool = UpstreamClient().pool(f"https://localhost:{tls_upstream.port}")  # system CAs
        with pytest.raises(UpstreamError) as e:
            await pool.request("POST", "/x", headers=JSON, body=BODY)
        return e.value, pool.stats()

    err, stats = run(main())
    assert err.kind is ErrorKind.TLS
    assert "certificate" in str(err) and str(err).startswith(f"https://localhost:{tls_upstream.port}")
    assert stats["open"] == 0 and stats["connect_errors"] == 1
    assert tls_upstream.state()["requests"] == 0


def test_a_certificate_for_another_host_fails_with_kind_tls(tmp_path):
    ca_file, chain = issue(tmp_path, "other.example")
    up = FakeUpstream(tmp_path / "up", tls=(chain, chain)).start()
    try:
        async def main() -> UpstreamError:
            pool = UpstreamClient().pool(f"https://localhost:{up.port}", ca_file=ca_file)
            with pytest.raises(UpstreamError) as e:
                await pool.request("GET", "/")
            return e.value

        err = run(main())
        assert err.kind is ErrorKind.TLS and "mismatch" in str(err).lower()
    finally:
        up.stop()


def test_a_tls_handshake_that_never_ends_is_a_connect_timeout():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accepts and says nothing: no ServerHello ever
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        async def main() -> UpstreamError:
            pool = UpstreamClient().pool(f"https://127.0.0.1:{srv.getsockname()[1]}",
                                         timeouts=Timeouts(connect=0.3))
            with pytest.raises(UpstreamError) as e:
                await pool.request("GET", "/")
            return e.value

        assert run(main()).kind is ErrorKind.CONNECT_TIMEOUT
    finally:
        stop.set()
        t.join(5)
        for s in held:
            s.close()
        srv.close()


def test_a_cancelled_tls_stream_closes_the_connection(tls_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(tls_upstream.url, ca_file=tls_upstream.ca_file)
        r = await pool.request("POST", "/x",
                               headers=JSON + HeaderBlock({"x-fake": "stream;count=100;delay_ms=50"}),
                               body=BODY)

        async def consume() -> None:
            async with r:
                async for _ in r.sse():
                    pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return pool.stats()

    assert run(main())["open"] == 0
    tls_upstream.wait_for(lambda s: s["disconnects"] == 1 and s["connections_open"] == 0)


def test_a_connection_closed_as_it_is_handed_on_is_not_used(tls_upstream):
    """TLS can deliver an answer and the upstream's close_notify in one read: the
    connection is handed to a waiting request, then closed before that request
    runs. The request must take another turn (a new connection)."""
    async def main() -> tuple[list[int], dict[str, Any]]:
        pool = UpstreamClient().pool(tls_upstream.url, ca_file=tls_upstream.ca_file,
                                     limits=PoolLimits(max_connections=1),
                                     timeouts=Timeouts(first_byte=5))

        async def one(spec: str) -> int:
            r = await pool.request("POST", "/x", headers=JSON + HeaderBlock({"x-fake": spec}),
                                   body=BODY)
            await r.read()
            return r.status

        first = asyncio.ensure_future(one("close_after;ms=200"))
        await asyncio.sleep(0.05)
        # blocked while the upstream answers and closes: both are read in one turn
        asyncio.get_running_loop().call_later(0.1, time.sleep, 0.4)
        statuses = await asyncio.gather(first, one("chat"), one("chat"))
        return statuses, pool.stats()

    statuses, stats = run(main(), timeout=20)
    assert statuses == [200, 200, 200]
    assert stats["connects"] >= 2 and stats["open"] <= 1
