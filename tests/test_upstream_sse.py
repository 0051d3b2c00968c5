"""The SSE splitter (neurohttp/upstream/sse.py): events out of arbitrary chunks,
WHATWG field rules, OpenAI's [DONE], and a bound on what one event may hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from neurohttp.upstream import ErrorKind, SSEDecoder, UpstreamError, sse_batches, sse_events


def events(*chunks: bytes) -> list[tuple[bytes, str, str | None, int | None]]:
    d = SSEDecoder()
    out = []
    for c in chunks:
        out += [(e.data, e.event, e.id, e.retry) for e in d.feed(c)]
    return out


def test_data_lines_fields_and_comments():
    stream = (b": keep-alive\n"
              b"data: {\"a\":1}\n\n"
              b"event: delta\nid: 7\nretry: 250\ndata: line one\ndata:line two\ndata\n\n"
              b"data:  spaced\nunknown: x\n\n"
              b"id: 8\n\n"            # no data: nothing dispatched, but the id sticks
              b"data: [DONE]\n\n")
    assert events(stream) == [
        (b'{"a":1}', "", None, None),
        (b"line one\nline two\n", "delta", "7", 250),
        (b" spaced", "", "7", None),
        (b"[DONE]", "", "8", None),
    ]
    d = SSEDecoder()
    d.feed(stream)
    assert d.comments == 1


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_whatever_the_split(eol):
    stream = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    want = [(b"a\nb", "", None, None), (b"c", "", None, None)]
    assert events(stream) == want
    assert events(*[stream[i:i + 1] for i in range(len(stream))]) == want


def test_a_crlf_split_between_reads_is_one_line_end():
    assert events(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [(b"a\nb", "", None, None)]


def test_bom_at_the_start_is_dropped():
    assert events(b"\xef\xbb", b"\xbfdata: x\n\n") == [(b"x", "", None, None)]


def test_done_and_json_helpers():
    (ev,) = SSEDecoder().feed(b'data: {"choices":[]}\n\n')
    assert ev.json() == {"choices": []} and not ev.done and ev.text == '{"choices":[]}'
    (ev,) = SSEDecoder().feed(b"data: [DONE]\n\n")
    assert ev.done


def test_an_endless_event_is_refused():
    d = SSEDecoder(max_event_bytes=1000)
    with pytest.raises(UpstreamError) as e:
        for _ in range(100):
            d.feed(b"data: " + b"x" * 50 + b"\n")
    assert e.value.kind is ErrorKind.PROTOCOL
    d = SSEDecoder(max_event_bytes=1000)
    with pytest.raises(UpstreamError):
        for _ in range(100):
            d.feed(b"x" * 50)  # one line that never ends


def test_memory_is_held_for_one_event_only():
    d = SSEDecoder(max_event_bytes=1000)
    for _ in range(10000):  # 10,000 events of 600 bytes: each under the bound
        assert len(d.feed(b"data: " + b"y" * 600 + b"\n\n")) == 1


async def chunks(*parts: bytes, then: list[bytes] | None = None) -> AsyncIterator[bytes]:
    for p in parts:
        yield p
    for p in then or []:
        yield p


def collect(it: AsyncIterator) -> list:
    async def main() -> list:
        return [e.data async for e in it]
    return asyncio.run(main())


def test_sse_events_ends_with_done_after_reading_the_rest():
    rest: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\ndata: [DO"
        yield b"NE]\n\n"
        rest.append(b"read")  # the body's end is read before [DONE] is handed over
        yield b""

    assert collect(sse_events(body())) == [b"1", b"[DONE]"]
    assert rest == [b"read"]


def test_sse_events_does_not_wait_forever_after_done():
    async def body() -> AsyncIterator[bytes]:
        yield b"data: [DONE]\n\n"
        await asyncio.sleep(30)  # an upstream that keeps the stream open
        yield b""

    async def main() -> list:
        return [e.data async for e in sse_events(body(), done_grace_s=0.1)]
    assert asyncio.run(asyncio.wait_for(main(), 5)) == [b"[DONE]"]


def test_an_incomplete_event_at_the_end_is_dropped():
    assert collect(sse_events(chunks(b"data: 1\n\ndata: 2"))) == [b"1"]


def test_sse_batches_are_the_events_each_chunk_completed_and_end_at_done():
    async def main() -> list:
        return [[e.data for e in batch] async for batch in sse_batches(chunks(
            b"data: 1\n\ndata: 2\n\ndata: 3", b"\n\n", b": ping\n\n",
            b"data: 4\n\ndata: [DONE]\n\ndata: after\n\n"))]
    # a chunk that completes nothing (a comment) makes no batch; nothing after [DONE]
    assert asyncio.run(main()) == [[b"1", b"2"], [b"3"], [b"4", b"[DONE]"]]
