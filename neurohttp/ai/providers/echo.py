"""The built-in echo model: a deterministic answer, streamed word by word.

It answers `response` from its config, "Hello, AI world!" by default, whatever
the prompt; `token_delay_ms` paces the tokens like a real model would, and
`max_tokens` cuts the answer to that many tokens.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

DEFAULT_ANSWER = "Hello, AI world!"
_WORDS = re.compile(r"\s*\S+|\s+$")


def words(text: str) -> list[str]:
    """Split into tokens that carry their own leading spaces: they join back to `text`."""
    return _WORDS.findall(text)


class EchoProvider:
    name = "echo"

    def __init__(self, options: dict[str, Any]) -> None:
        self.answer = options.get("response") or DEFAULT_ANSWER
        self.delay = float(options.get("token_delay_ms", 0)) / 1000.0
        self._tokens = words(self.answer)

    def tokens(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> list[str]:
        toks = self._tokens
        limit = params.get("max_tokens")
        if isinstance(limit, int) and limit >= 0:
            toks = toks[:limit]
        return toks

    def complete_now(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> str | None:
        """The whole answer at once, when there is no pacing to honour."""
        if self.delay:
            return None
        if params.get("max_tokens") is None:
            return self.answer
        return "".join(self.tokens(messages, params))

    async def stream(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> AsyncIterator[str]:
        delay = self.delay
        for i, tok in enumerate(self.tokens(messages, params)):
            if delay and i:
                await asyncio.sleep(delay)
            yield tok
