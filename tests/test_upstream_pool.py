"""The upstream client over real sockets (uvloop, as in a worker): pooling,
reuse, the bound, stale connections, timeouts, cancellation, streaming both
ways, against the fake upstream (tests/fake_upstream.py) and nginx."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
import uvloop
from nginx_server import Nginx

from neurohttp.upstream import (
    ErrorKind,
    HeaderBlock,
    PoolLimits,
    Timeouts,
    UpstreamClient,
    UpstreamError,
)

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run in a fresh uvloop loop (the worker's loop), bounded."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return uvloop.run(bounded())


def chat(model: str = "gpt-test", stream: bool = False, **extra: Any) -> bytes:
    return json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


JSON = HeaderBlock({"Content-Type": "application/json", "Authorization": "Bearer sk-test"})


def fake(spec: str) -> HeaderBlock:
    return JSON + HeaderBlock({"x-fake": spec})


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- pooling
def test_keep_alive_connections_are_reused(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url)
        for i in range(5):
            async with await pool.request("POST", "/v1/chat/completions", headers=JSON,
                                          body=chat(f"m{i}")) as r:
                assert r.status == 200
                assert (await r.json())["fake"]["model"] == f"m{i}"
        return pool.stats()

    stats = run(main())
    assert stats["connects"] == 1 and stats["reuses"] == 4 and stats["requests"] == 5
    assert fake_upstream.state()["connections_total"] == 1


def test_the_bound_is_kept_and_waiting_requests_are_served_in_turn(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url, limits=PoolLimits(max_connections=2))

        async def one(i: int) -> int:
            r = await pool.request("POST", "/v1/chat/completions", headers=fake("delay;ms=150"),
                                   body=chat(f"m{i}"))
            assert (await r.json())["fake"]["model"] == f"m{i}"
            return r.status

        assert await asyncio.gather(*(one(i) for i in range(6))) == [200] * 6
        return pool.stats()

    stats = run(main())
    assert stats["connects"] == 2 and stats["waits"] == 4 and stats["wait_timeouts"] == 0
    assert stats["open"] == 2 and stats["waiting"] == 0
    assert fake_upstream.state()["connections_total"] == 2


def test_the_wait_for_a_free_connection_is_bounded_and_counted(fake_upstream):
    async def main() -> tuple[UpstreamError, dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url, limits=PoolLimits(max_connections=1),
                                     timeouts=Timeouts(pool=0.3))
        hanging = asyncio.ensure_future(pool.request("POST", "/x", headers=fake("hang"),
                                                     body=b"{}"))
        await asyncio.sleep(0.1)
        with pytest.raises(UpstreamError) as e:
            await pool.request("POST", "/x", headers=JSON, body=chat())
        hanging.cancel()
        await asyncio.gather(hanging, return_exceptions=True)
        return e.value, pool.stats()

    err, stats = run(main())
    assert err.kind is ErrorKind.POOL_TIMEOUT and err.timeout
    assert "no free connection within 0.3 s" in str(err)
    assert stats["waits"] == 1 and stats["wait_timeouts"] == 1 and stats["open"] == 0


def test_idle_connections_are_reused_last_in_first_out(fake_upstream):
    async def main() -> None:
        pool = UpstreamClient().pool(fake_upstream.url)
        # two connections released in this order: A (after 50 ms), then B (after 250 ms)
        a = pool.request("POST", "/x", headers=fake("delay;ms=50"), body=chat("a"))
        b = pool.request("POST", "/x", headers=fake("delay;ms=250"), body=chat("b"))
        for r in await asyncio.gather(a, b):
            await r.read()
        r = await pool.request("POST", "/x", headers=JSON, body=chat("c"))
        await r.read()

    run(main())
    log = {e["body"]["model"]: e["conn"] for e in fake_upstream.state()["log"]}
    assert log["a"] != log["b"]
    assert log["c"] == log["b"]  # the most recently released


def test_idle_connections_are_closed_after_keepalive_s(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url, limits=PoolLimits(keepalive_s=0.3))
        await (await pool.request("POST", "/x", headers=JSON, body=chat())).read()
        assert pool.stats()["idle"] == 1
        for _ in range(200):
            if pool.stats()["open"] == 0:
                break
            await asyncio.sleep(0.02)
        return pool.stats()

    stats = run(main())
    assert stats["open"] == 0 and stats["idle_expired"] == 1
    fake_upstream.wait_for(lambda s: s["connections_open"] == 0)


# ---------------------------------------------------------------- stale connections
def test_a_stale_connection_is_retried_once_on_a_fresh_one(fake_upstream):
    async def main() -> tuple[list[str], dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        # the upstream answers, then closes that connection as the next request comes
        r = await pool.request("POST", "/x", headers=fake("close_next"), body=chat("first"))
        await r.read()
        r = await pool.request("POST", "/x", headers=JSON, body=chat("second"))
        return [(await r.json())["fake"]["model"]], pool.stats()

    models, stats = run(main())
    assert models == ["second"]
    assert stats["stale_retries"] == 1 and stats["connects"] == 2
    st = fake_upstream.state()
    assert st["connections_total"] == 2 and st["requests"] == 3  # the lost one, then the retry


def test_a_stale_retry_happens_once_only(fake_upstream):
    async def main() -> tuple[UpstreamError, dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        await (await pool.request("POST", "/x", headers=fake("close_next"), body=chat())).read()
        with pytest.raises(UpstreamError) as e:
            # stale on the reused connection, then closed unanswered on the fresh one
            await pool.request("POST", "/x", headers=fake("close"), body=chat())
        return e.value, pool.stats()

    err, stats = run(main())
    assert err.kind is ErrorKind.CLOSED and not err.response_started
    assert stats["stale_retries"] == 1 and stats["connects"] == 2


def test_an_upstream_closing_right_after_answering_with_requests_waiting(fake_upstream):
    async def main() -> tuple[list[int], dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url, limits=PoolLimits(max_connections=1),
                                     timeouts=Timeouts(first_byte=5))

        async def one(spec: str) -> int:
            r = await pool.request("POST", "/x", headers=fake(spec), body=chat())
            await r.read()
            return r.status

        # the connection goes to a waiting request, whose request meets the close
        # (a stale connection: retried on a new one); over TLS the close can even
        # come before that request runs (tests/test_upstream_tls.py)
        first = asyncio.ensure_future(one("close_after;ms=200"))
        await asyncio.sleep(0.05)
        statuses = await asyncio.gather(first, one("chat"), one("chat"))
        return statuses, pool.stats()

    statuses, stats = run(main(), timeout=20)
    assert statuses == [200, 200, 200]
    assert stats["open"] <= 1 and stats["stale_retries"] == 1


def test_a_fresh_connection_closed_unanswered_is_not_retried(fake_upstream):
    fake_upstream.accept_close(1)

    async def main() -> tuple[UpstreamError, dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        with pytest.raises(UpstreamError) as e:
            await pool.request("POST", "/x", headers=JSON, body=chat())
        return e.value, pool.stats()

    err, stats = run(main())
    assert err.kind is ErrorKind.CLOSED and stats["stale_retries"] == 0
    assert stats["connects"] == 1 and stats["open"] == 0


def test_a_streamed_body_already_sent_is_not_replayed(fake_upstream):
    async def main() -> tuple[UpstreamError, dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        await (await pool.request("POST", "/x", headers=fake("close_next"), body=chat())).read()

        async def body() -> AsyncIterator[bytes]:
            yield b'{"model":'
            await asyncio.sleep(0.05)
            yield b'"m"}'

        with pytest.raises(UpstreamError) as e:
            await pool.request("POST", "/x", headers=JSON, body=body())
        return e.value, pool.stats()

    err, stats = run(main())
    assert err.kind is ErrorKind.CLOSED and stats["stale_retries"] == 0


def test_a_connection_the_upstream_closes_while_idle_leaves_the_pool(tmp_path):
    with Nginx(tmp_path, keepalive_timeout="1s") as ng:
        async def main() -> dict[str, Any]:
            pool = UpstreamClient().pool(ng.url)
            await (await pool.request("POST", "/v1/chat/completions", body=chat())).read()
            assert pool.stats()["idle"] == 1
            for _ in range(300):  # nginx closes it after 1 s; the pool sees the EOF
                if pool.stats()["open"] == 0:
                    break
                await asyncio.sleep(0.02)
            st = pool.stats()
            r = await pool.request("POST", "/v1/chat/completions", body=chat())
            assert r.status == 200 and (await r.json())["object"] == "chat.completion"
            return {**st, "after": pool.stats()}

        stats = run(main())
    assert stats["open"] == 0 and stats["closed_while_idle"] == 1
    assert stats["after"]["connects"] == 2 and stats["after"]["stale_retries"] == 0


def test_nginx_closing_after_keepalive_requests_is_followed(tmp_path):
    with Nginx(tmp_path, keepalive_requests=3) as ng:
        async def main() -> dict[str, Any]:
            pool = UpstreamClient().pool(ng.url)
            for _ in range(10):
                r = await pool.request("POST", "/v1/chat/completions", body=chat())
                assert r.status == 200
                await r.read()
            return pool.stats()

        stats = run(main())
    # nginx answers the 3rd request of a connection with "Connection: close"
    assert stats["connects"] == 4 and stats["stale_retries"] == 0


def test_head_and_error_statuses_from_nginx(tmp_path):
    with Nginx(tmp_path) as ng:
        async def main() -> list[Any]:
            pool = UpstreamClient().pool(ng.url)
            r = await pool.request("HEAD", "/v1/chat/completions")
            head = (r.status, r.headers["content-type"], await r.read())
            r = await pool.request("GET", "/missing")
            missing = r.status
            await r.read()
            return [head, missing, pool.stats()["connects"]]

        head, missing, connects = run(main())
    assert head == (200, "application/json", b"")
    assert missing in (403, 404) and connects == 1


# ---------------------------------------------------------------- errors and timeouts
def test_connect_refused_is_kind_connect():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main() -> UpstreamError:
        with pytest.raises(UpstreamError) as e:
            await UpstreamClient().request("GET", f"http://127.0.0.1:{port}/")
        return e.value

    err = run(main())
    assert err.kind is ErrorKind.CONNECT and "refused" in str(err).lower()


def test_an_unknown_host_is_kind_connect():
    async def main() -> UpstreamError:
        with pytest.raises(UpstreamError) as e:
            await UpstreamClient().request("GET", "http://no-such-host.invalid/")
        return e.value

    assert run(main()).kind is ErrorKind.CONNECT


def test_connect_timeout():
    # a listener whose accept queue is full: the kernel drops our SYNs
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(srv.getsockname())
            fillers.append(s)
        time.sleep(0.1)

        async def main() -> UpstreamError:
            pool = UpstreamClient().pool(f"http://127.0.0.1:{srv.getsockname()[1]}",
                                         timeouts=Timeouts(connect=0.3))
            with pytest.raises(UpstreamError) as e:
                await pool.request("GET", "/")
            assert pool.stats()["open"] == 0 and pool.stats()["connect_errors"] == 1
            return e.value

        err = run(main())
        assert err.kind is ErrorKind.CONNECT_TIMEOUT and err.timeout
    finally:
        for s in fillers:
            s.close()
        srv.close()


def test_first_byte_timeout_and_the_upstream_sees_the_close(fake_upstream):
    async def main() -> UpstreamError:
        pool = UpstreamClient().pool(fake_upstream.url, timeouts=Timeouts(first_byte=0.3))
        with pytest.raises(UpstreamError) as e:
            await pool.request("POST", "/x", headers=fake("hang"), body=chat())
        assert pool.stats()["open"] == 0
        return e.value

    err = run(main())
    assert err.kind is ErrorKind.FIRST_BYTE_TIMEOUT and not err.response_started
    fake_upstream.wait_for(lambda s: s["disconnects"] == 1 and s["connections_open"] == 0)


def test_idle_timeout_between_stream_events(fake_upstream):
    async def main() -> tuple[int, UpstreamError]:
        pool = UpstreamClient().pool(fake_upstream.url, timeouts=Timeouts(idle=0.3))
        events = 0
        with pytest.raises(UpstreamError) as e:
            async with await pool.request("POST", "/x", headers=fake("stream;delay_ms=2000"),
                                          body=chat(stream=True)) as r:
                async for _ in r.sse():
                    events += 1
        return events, e.value

    events, err = run(main())
    assert events == 1 and err.kind is ErrorKind.IDLE_TIMEOUT and err.response_started
    fake_upstream.wait_for(lambda s: s["streams_cut"] == 1 and s["connections_open"] == 0)


def test_total_timeout(fake_upstream):
    async def main() -> tuple[int, UpstreamError]:
        pool = UpstreamClient().pool(fake_upstream.url, timeouts=Timeouts(total=0.5))
        events = 0
        with pytest.raises(UpstreamError) as e:
            async with await pool.request("POST", "/x",
                                          headers=fake("stream;count=100;delay_ms=50"),
                                          body=chat(stream=True)) as r:
                async for _ in r.sse():
                    events += 1
        return events, e.value

    events, err = run(main())
    assert 1 <= events < 100 and err.kind is ErrorKind.TOTAL_TIMEOUT
    fake_upstream.wait_for(lambda s: s["streams_cut"] == 1)


def test_per_request_timeouts_override_the_pool_s(fake_upstream):
    async def main() -> UpstreamError:
        pool = UpstreamClient().pool(fake_upstream.url)  # first byte: 60 s
        with pytest.raises(UpstreamError) as e:
            await pool.request("POST", "/x", headers=fake("hang"), body=chat(),
                               timeouts=Timeouts(first_byte=0.2))
        return e.value

    assert run(main()).kind is ErrorKind.FIRST_BYTE_TIMEOUT


def test_an_upstream_closing_mid_stream_is_closed_mid_response(fake_upstream):
    async def main() -> tuple[list[str], UpstreamError]:
        pool = UpstreamClient().pool(fake_upstream.url)
        got = []
        with pytest.raises(UpstreamError) as e:
            async with await pool.request("POST", "/x", headers=fake("close_mid_stream;after=3"),
                                          body=chat(stream=True)) as r:
                async for ev in r.sse():
                    got.append(ev.json()["choices"][0]["delta"].get("content", ""))
        return got, e.value

    got, err = run(main())
    assert got == ["", "tok0 ", "tok1 ", "tok2 "]
    assert err.kind is ErrorKind.CLOSED_MID_RESPONSE and err.response_started


def test_an_invalid_response_is_a_protocol_error(fake_upstream):
    async def main() -> tuple[UpstreamError, dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        with pytest.raises(UpstreamError) as e:
            await pool.request("POST", "/x", headers=fake("garbage"), body=chat())
        return e.value, pool.stats()

    err, stats = run(main())
    assert err.kind is ErrorKind.PROTOCOL and stats["open"] == 0


def test_status_errors_carry_retry_after(fake_upstream):
    async def main() -> tuple[bytes, UpstreamError, int]:
        pool = UpstreamClient().pool(fake_upstream.url)
        r = await pool.request("POST", "/x", headers=fake("status;code=429;retry_after=2"),
                               body=chat())
        body = await r.read()
        with pytest.raises(UpstreamError) as e:
            r.raise_for_status()
        r = await pool.request("POST", "/x", headers=JSON, body=chat())
        r.raise_for_status()
        await r.read()
        return body, e.value, pool.stats()["connects"]

    body, err, connects = run(main())
    assert json.loads(body)["error"]["code"] == "429"
    assert err.kind is ErrorKind.STATUS and err.status == 429 and err.retry_after == 2.0
    assert connects == 1  # an error status does not cost the connection


# ---------------------------------------------------------------- cancellation
def test_a_cancelled_consumer_closes_the_upstream_connection_at_once(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url)
        got = asyncio.Event()

        async def consume() -> None:
            async with await pool.request("POST", "/x",
                                          headers=fake("stream;count=100;delay_ms=50"),
                                          body=chat(stream=True)) as r:
                async for ev in r.sse():
                    if ev.json()["choices"][0]["delta"].get("content") == "tok1 ":
                        got.set()

        task = asyncio.ensure_future(consume())
        await got.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return pool.stats()  # no loop turn since: closed synchronously

    stats = run(main())
    assert stats["open"] == 0 and stats["idle"] == 0
    st = fake_upstream.wait_for(lambda s: s["disconnects"] == 1 and s["connections_open"] == 0)
    assert st["streams_cut"] == 1 and st["streams_done"] == 0


def test_a_cancelled_plain_iteration_closes_the_connection(fake_upstream):
    """No `async with`: the cancellation lands in the response's own wait."""
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url)
        r = await pool.request("POST", "/x", headers=fake("stream;count=100;delay_ms=50"),
                               body=chat(stream=True))

        async def consume() -> None:
            async for _ in r:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return pool.stats()

    assert run(main())["open"] == 0
    fake_upstream.wait_for(lambda s: s["disconnects"] == 1 and s["connections_open"] == 0)


def test_closing_the_response_before_its_end_closes_the_connection(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url)
        r = await pool.request("POST", "/x", headers=fake("stream;count=100;delay_ms=50"),
                               body=chat(stream=True))
        it = r.sse()
        await anext(it)
        await it.aclose()     # the consumer's generator goes away...
        await r.aclose()      # ...and the response with it
        return pool.stats()

    stats = run(main())
    assert stats["open"] == 0
    fake_upstream.wait_for(lambda s: s["disconnects"] == 1 and s["connections_open"] == 0)


def test_a_response_read_to_its_end_returns_its_connection(fake_upstream):
    async def main() -> tuple[list[str], dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        out = []
        for _ in range(3):
            async with await pool.request("POST", "/x", headers=fake("stream;count=3"),
                                          body=chat(stream=True)) as r:
                async for ev in r.sse():
                    out.append("[DONE]" if ev.done else
                               ev.json()["choices"][0]["delta"].get("content", ""))
                    if ev.done:
                        break  # a consumer that stops at [DONE]: the body was read first
        return out, pool.stats()

    out, stats = run(main())
    assert out == ["", "tok0 ", "tok1 ", "tok2 ", "", "[DONE]"] * 3
    assert stats["connects"] == 1 and stats["idle"] == 1
    assert fake_upstream.state()["streams_done"] == 3


def test_cancelling_a_request_waiting_for_its_head_closes_the_connection(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url)
        task = asyncio.ensure_future(pool.request("POST", "/x", headers=fake("hang"), body=chat()))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return pool.stats()

    assert run(main())["open"] == 0
    fake_upstream.wait_for(lambda s: s["disconnects"] == 1 and s["connections_open"] == 0)


def test_cancelling_a_waiting_request_gives_its_turn_on(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url, limits=PoolLimits(max_connections=1))
        busy = asyncio.ensure_future(pool.request("POST", "/x", headers=fake("delay;ms=300"),
                                                  body=chat()))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(pool.request("POST", "/x", headers=JSON, body=chat()))
        after = asyncio.ensure_future(pool.request("POST", "/x", headers=JSON, body=chat("last")))
        await asyncio.sleep(0.05)
        waiting.cancel()
        r = await busy
        await r.read()
        r = await after
        assert (await r.json())["fake"]["model"] == "last"
        await asyncio.gather(waiting, return_exceptions=True)
        return pool.stats()

    stats = run(main())
    assert stats["open"] == 1 and stats["waiting"] == 0 and stats["connects"] == 1


# ---------------------------------------------------------------- streaming both ways
def test_sse_events_split_across_chunks_over_a_socket(fake_upstream):
    async def main() -> tuple[list[str], Any]:
        pool = UpstreamClient().pool(fake_upstream.url)
        out = []
        async with await pool.request(
                "POST", "/x", headers=fake("stream;count=20;fragment=7;pings=1"),
                body=chat(stream=True, stream_options={"include_usage": True})) as r:
            assert r.headers["content-type"] == "text/event-stream"
            async for ev in r.sse():
                if ev.done:
                    out.append("[DONE]")
                    break
                doc = ev.json()
                if doc["choices"]:
                    out.append(doc["choices"][0]["delta"].get("content", ""))
                else:
                    out.append(doc["usage"]["completion_tokens"])
        return out, pool.stats()["idle"]

    out, idle = run(main())
    assert out == ["", *(f"tok{i} " for i in range(20)), "", 20, "[DONE]"]
    assert idle == 1


def test_tool_call_deltas_pass_through(fake_upstream):
    async def main() -> tuple[str, str]:
        pool = UpstreamClient().pool(fake_upstream.url)
        args = ""
        async with await pool.request("POST", "/x", headers=fake("tools"),
                                      body=chat(stream=True)) as r:
            async for ev in r.sse():
                if not ev.done:
                    for call in ev.json()["choices"][0]["delta"].get("tool_calls", []):
                        args += call["function"]["arguments"]
        r = await pool.request("POST", "/x", headers=fake("tools"), body=chat())
        whole = (await r.json())["choices"][0]["message"]["tool_calls"][0]["function"]
        return args, whole["arguments"]

    streamed, whole = run(main())
    assert json.loads(streamed) == json.loads(whole) == {"city": "Paris"}


def test_a_slow_consumer_pauses_the_upstream(fake_upstream):
    size = 64 << 20

    async def main() -> tuple[int, int]:
        pool = UpstreamClient().pool(fake_upstream.url)
        r = await pool.request("POST", "/x", headers=fake(f"big;bytes={size}"), body=b"")
        it = aiter(r)
        got = len(await anext(it))
        await asyncio.sleep(0.8)  # the consumer is slow: the upstream must wait too
        written = fake_upstream.state()["written"]
        async for data in it:
            got += len(data)
        return written, got

    written, got = run(main())
    # what was written while we did not read: our read buffer plus the kernel's
    # socket buffers, not the 64 MiB the upstream had to send
    assert written < 24 << 20, written
    assert got == size
    assert fake_upstream.state()["written"] == size


async def pieces(total: int, size: int = 65536, produced: list[int] | None = None
                 ) -> AsyncIterator[bytes]:
    """`total` bytes of a repeating pattern; `produced` counts what was taken."""
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        if produced is not None:
            produced[0] = sent
        yield block[:n]


def test_a_100_mib_chunked_upload_streams_without_memory_growth(fake_upstream):
    total = 100 << 20
    block = bytes(range(256)) * 256
    want = hashlib.sha256()
    for _ in range(total // len(block)):
        want.update(block)

    async def main() -> tuple[dict[str, Any], int]:
        pool = UpstreamClient().pool(fake_upstream.url)
        base = rss()
        peak = base

        async def body() -> AsyncIterator[bytes]:
            nonlocal peak
            async for piece in pieces(total):
                peak = max(peak, rss())
                yield piece

        r = await pool.request("POST", "/v1/files", headers=fake("sink"), body=body())
        return await r.json(), peak - base

    doc, growth = run(main(), timeout=120)
    assert doc == {"received": total, "sha256": want.hexdigest()}
    assert growth < 16 << 20, f"RSS grew by {growth >> 20} MiB during the upload"
    entry = fake_upstream.state()["log"][-1]
    assert entry["headers"]["transfer-encoding"] == "chunked"


def test_an_upstream_that_stops_reading_stops_the_upload(fake_upstream):
    async def main() -> tuple[int, UpstreamError]:
        pool = UpstreamClient().pool(fake_upstream.url, timeouts=Timeouts(idle=3))
        produced = [0]
        task = asyncio.ensure_future(pool.request(
            "POST", "/v1/files", headers=fake("sink;rate=1"), body=pieces(1 << 30, produced=produced)))
        last = -1
        for _ in range(40):  # until the producer is held (socket buffers full)
            await asyncio.sleep(0.25)
            if produced[0] == last:
                break
            last = produced[0]
        held = produced[0]
        with pytest.raises(UpstreamError) as e:
            await task
        return max(held, produced[0]), e.value

    held, err = run(main())
    # back-pressure: a 1 GiB body stops at the socket buffers plus 64 KiB in flight
    # and stays there (the kernel's window may still let a few pieces through)
    assert held < 32 << 20, held
    assert err.kind is ErrorKind.IDLE_TIMEOUT and "took none of the request body" in str(err)


def test_an_early_answer_stops_the_upload(fake_upstream):
    async def main() -> tuple[int, int, dict[str, Any]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        produced = [0]
        r = await pool.request("POST", "/v1/files", headers=fake("early;code=413"),
                               body=pieces(1 << 30, produced=produced))
        await r.read()
        return r.status, produced[0], pool.stats()

    status, produced, stats = run(main())
    assert status == 413 and produced < 64 << 20
    assert stats["open"] == 0  # the request was cut short: the connection is not reused


def test_a_failing_request_body_closes_the_connection(fake_upstream):
    async def main() -> dict[str, Any]:
        pool = UpstreamClient().pool(fake_upstream.url)

        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            await asyncio.sleep(0.05)
            raise ConnectionResetError("the proxied client went away")

        with pytest.raises(ConnectionResetError):
            await pool.request("POST", "/v1/files", headers=fake("sink"), body=body())
        return pool.stats()

    assert run(main())["open"] == 0
    fake_upstream.wait_for(lambda s: s["connections_open"] == 0)


def test_the_client_works_on_the_asyncio_loop_too(fake_upstream):
    async def main() -> tuple[int, list[bytes]]:
        pool = UpstreamClient().pool(fake_upstream.url)
        r = await pool.request("POST", "/x", headers=JSON, body=chat())
        await r.read()
        async with await pool.request("POST", "/x", headers=fake("stream;count=2;delay_ms=10"),
                                      body=chat(stream=True)) as r:
            events = [ev.data async for ev in r.sse()]
        return pool.stats()["connects"], events

    connects, events = asyncio.run(asyncio.wait_for(main(), 30))
    assert connects == 1 and events[-1] == b"[DONE]" and len(events) == 5


def test_client_pools_by_origin_and_settings(fake_upstream):
    client = UpstreamClient()
    a = client.pool(fake_upstream.url + "/v1")
    assert client.pool(fake_upstream.url + "/other") is a
    assert client.pool(fake_upstream.url, limits=PoolLimits(max_connections=3)) is not a
    with pytest.raises(ValueError):
        client.pool("ftp://x/")
    with pytest.raises(ValueError) as e:
        client.pool("http://user:sk-secret@h/")
    assert "sk-secret" not in str(e.value)
