"""The built-in echo model: a deterministic answer, streamed word by word.

What it answers (docs/STREAMING.md has the same table):

- `response` from its config, "Hello, AI world!" by default, whatever the
  prompt. `{prompt}` in `response` is replaced by the text of the last user
  message, so `response = "{prompt}"` makes it a parrot.
- `max_tokens` cuts the answer to that many cl100k_base tokens.
- `repeat = true` repeats the answer (joined by spaces) until `max_tokens`
  tokens have been produced: long, exactly sized streams for tests and
  benchmarks. Without `max_tokens` the answer is given once.
- `split = "word"` streams word by word (each token carries its leading
  space); `split = "token"` streams tiktoken token by token.
- `token_delay_ms` is the pause before every token after the first.
- `temperature`, `top_p`, `seed` and the rest are accepted and ignored.

A long answer (a parrot of a long prompt, a long repeat) is cut into pieces
lazily, as it is sent, and its words are at most WORD_MAX characters, so no
request builds a huge list or holds the event loop for long (the pipeline
and the handlers let the loop run between slices of it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, cast

from .. import tokenizer
from . import LENGTH, STOP, Finish

log = logging.getLogger("neurohttp")

DEFAULT_ANSWER = "Hello, AI world!"
WORD_MAX = 64  # the longest word piece (longer words and runs of spaces are cut)
_WORDS = re.compile(rf"\s{{0,{WORD_MAX}}}\S{{1,{WORD_MAX}}}|\s{{1,{WORD_MAX}}}")
_CACHE_MAX_TOKENS = 4096  # answers up to this size are kept as ready lists
_INSTANT_MAX_CHARS = 16384  # a longer templated answer is not made in one go (complete_now)
_KEEP_MAX_CHARS = 4096    # a text up to this size is cut and counted once and kept
_YIELD_EVERY = 256        # an unpaced answer lets the loop run this often


def words(text: str) -> list[str]:
    """Split into tokens that carry their own leading spaces: they join back to `text`."""
    return _WORDS.findall(text)


def words_iter(text: str) -> Iterator[str]:
    """words(text), one at a time."""
    for m in _WORDS.finditer(text):
        yield m.group()


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content
                               if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


class _Plan:
    """An answer and how it is cut into pieces, each with its token count: the
    text once, then (with repeat) the unit " " + text, cycled. A short text is
    cut and counted once and kept; a long one (a parrot of a long prompt) is cut
    lazily, piece by piece as it is sent, and counted only when a limit needs it."""

    __slots__ = ("text", "split", "repeat", "_kept")

    def __init__(self, text: str, split: Callable[[str], Iterator[str]], repeat: bool) -> None:
        self.text = text
        self.split = split
        self.repeat = repeat and bool(text)
        self._kept: dict[str, list[tuple[str, int]]] = {}

    def _counted(self, text: str) -> Iterable[tuple[str, int]]:
        kept = self._kept.get(text)
        if kept is not None:
            return kept
        counted = ((p, tokenizer.count(p)) for p in self.split(text))
        if len(text) > _KEEP_MAX_CHARS:
            return counted
        kept = self._kept[text] = list(counted)
        return kept

    def pieces(self, limit: int | None) -> Iterator[str | Finish]:
        """The answer's pieces, at most `limit` tokens in all (None: the answer once),
        then why it ended."""
        if limit is None:
            yield from self.split(self.text)
            yield STOP
            return
        left = limit
        text = self.text
        while True:
            for p, n in self._counted(text):
                if n > left:
                    if left:  # the piece that crosses the limit, cut on a token boundary
                        cut = tokenizer.truncate(p, left)
                        if cut:
                            yield cut
                    yield LENGTH
                    return
                left -= n
                yield p
            if not self.repeat:
                break
            text = " " + self.text
        yield STOP


class EchoProvider:
    name = "echo"
    cuts_at_max_tokens = True  # its answers end at max_tokens cl100k tokens (_Plan.pieces)

    def __init__(self, options: dict[str, Any]) -> None:
        self.template = options.get("response") or DEFAULT_ANSWER
        self.templated = "{prompt}" in self.template
        self.delay = float(options.get("token_delay_ms", 0)) / 1000.0
        self.repeat = bool(options.get("repeat", False))
        self.split = (tokenizer.split_iter if options.get("split", "word") == "token"
                      else words_iter)
        self._plan: _Plan | None = None
        self._lists: dict[int | None, list[str | Finish]] = {}

    def plan(self, messages: list[dict[str, Any]]) -> _Plan:
        if self.templated:
            return _Plan(self.template.replace("{prompt}", last_user_text(messages)),
                         self.split, self.repeat)
        if self._plan is None:
            self._plan = _Plan(self.template, self.split, self.repeat)
        return self._plan

    def pieces(self, messages: list[dict[str, Any]],
               params: dict[str, Any]) -> Iterator[str | Finish]:
        limit = params.get("max_tokens")
        if type(limit) is not int or limit < 0:
            limit = None
        if self.templated:
            return self.plan(messages).pieces(limit)
        toks = self._lists.get(limit)
        if toks is None:
            if limit is not None and limit > _CACHE_MAX_TOKENS:
                return self.plan(messages).pieces(limit)  # long answers are made lazily
            toks = list(self.plan(messages).pieces(limit))
            if len(self._lists) < 64:
                self._lists[limit] = toks
        return iter(toks)

    def tokens(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> list[str | Finish]:
        return list(self.pieces(messages, params))

    def complete_now(self, messages: list[dict[str, Any]],
                     params: dict[str, Any]) -> str | tuple[str, str] | None:
        """The whole answer at once, when there is no pacing to honour and it is
        short; a long one is left to the token path, which shares the loop."""
        if self.delay:
            return None
        limit = params.get("max_tokens")
        if limit is None and not self.templated:
            return self.template  # the common case: no token list, no join
        if limit is not None and limit > _CACHE_MAX_TOKENS:
            return None
        if self.templated:
            plan = self.plan(messages)
            if len(plan.text) > _INSTANT_MAX_CHARS:
                return None
            if limit is None:
                return plan.text
            toks = list(plan.pieces(limit))
        else:
            toks = self.tokens(messages, params)
        last = toks.pop()  # a Finish, after text pieces
        assert isinstance(last, Finish)
        return "".join(cast("list[str]", toks)), last.reason

    def tokens_now(self, messages: list[dict[str, Any]],
                   params: dict[str, Any]) -> Iterator[str | Finish] | None:
        """All the answer's pieces as a plain iterator, when there is no pacing:
        the server can then frame ready tokens together."""
        return None if self.delay else self.pieces(messages, params)

    async def stream(self, messages: list[dict[str, Any]],
                     params: dict[str, Any]) -> AsyncIterator[str | Finish]:
        delay = self.delay
        n = 0
        try:
            for tok in self.pieces(messages, params):
                if tok.__class__ is Finish:
                    yield tok
                    break
                if n:
                    if delay:
                        await asyncio.sleep(delay)
                    elif not n % _YIELD_EVERY:
                        await asyncio.sleep(0)  # a long instant answer must not hold the loop
                yield tok
                n += 1
        except (GeneratorExit, asyncio.CancelledError):
            # the consumer went away: this is where an upstream request would be cancelled
            log.debug("echo: stream stopped after %d tokens", n)
            raise
