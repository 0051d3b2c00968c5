"""The response cache: whole answers to identical non-streaming chat requests,
kept in memory per worker (docs/CACHE.md).

A model opts in with `cache_ttl_s` in its `[models.<name>]` table. A request
is identical to an earlier one when its public model, the API key it was
admitted with (None without [auth]) and everything the provider receives
(`messages` and the other parameters, key order normalised) are the same:
the key is a 32-byte BLAKE2b digest of their canonical JSON, so a long prompt
is not kept twice. Only requests at temperature 0 are cacheable unless the
model sets `cache_nondeterministic`; the pipeline never asks for a stream.

The cache is bounded by `[cache] max_entries` and `max_bytes` (the UTF-8 JSON
size of each answer plus its key) and evicts the least recently used entry
past either. An entry past its ttl is dropped when it is next looked up (a
miss) or when it reaches the old end of the LRU order. Its figures are written
into the worker's stats slot (counters summed across workers, and the size
and entries as gauges that die with the worker): `figures` reads them back
for /stats and /metrics.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b
from time import monotonic
from typing import Any

import orjson

from ..stats import layout as L
from ..stats.block import StatsBlock
from ..stats.snapshot import copy_consistent

HIT = "hit"
MISS = "miss"
HEADER = "x-neurohttp-cache"
KEY_BYTES = 32

_NUMBER = (int, float)
_SORTED = orjson.OPT_SORT_KEYS


def request_key(model: str, api_key: str | None, messages: list[dict[str, Any]],
                params: dict[str, Any]) -> bytes:
    """The cache key of a request: a digest of its canonical JSON (keys sorted
    at every depth). `params` holds every field the provider gets but
    `messages` (the API's own fields are taken out and checked: `stream` is not
    in it, `max_completion_tokens` is there as `max_tokens` too)."""
    canonical = orjson.dumps([model, api_key, messages, params], option=_SORTED)
    return blake2b(canonical, digest_size=KEY_BYTES).digest()


def deterministic(params: dict[str, Any]) -> bool:
    """Whether the request asks for a temperature of 0. An absent temperature is
    the model's default, which for OpenAI and most upstreams is 1: not cacheable
    (a model whose answers do not vary sets `cache_nondeterministic`)."""
    t = params.get("temperature")
    return type(t) in _NUMBER and t == 0


class Answer:
    """A whole answer as the cache keeps it: what the handlers frame (text,
    finish_reason, tool_calls/refusal, logprobs; the upstream's other message
    fields, top-level fields and choices 1..n-1 as they came: an n > 1 answer
    is kept whole) and its completion tokens (of every choice); the
    prompt tokens only when the provider reported them (else each request's
    own count is used, which depends on the API it came through)."""

    __slots__ = ("text", "finish_reason", "extras", "logprobs", "prompt_tokens",
                 "completion_tokens", "fields", "top", "choices", "size")

    def __init__(self, text: str, finish_reason: str, extras: dict[str, Any] | None,
                 logprobs: dict[str, Any] | None, prompt_tokens: int | None,
                 completion_tokens: int, fields: dict[str, Any] | None = None,
                 top: dict[str, Any] | None = None,
                 choices: list[dict[str, Any]] | None = None) -> None:
        self.text = text
        self.finish_reason = finish_reason
        self.extras = extras
        self.logprobs = logprobs
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.fields = fields
        self.top = top
        self.choices = choices
        size = len(text.encode()) if not text.isascii() else len(text)
        if extras or logprobs or fields or top or choices:
            size += len(orjson.dumps([extras, logprobs, fields, top, choices]))
        self.size = size + KEY_BYTES


class ResponseCache:
    """One worker's cache: an LRU of key -> (expiry, answer), bounded in entries
    and bytes, its figures in the worker's stats slot (`slot`: the slot's words)."""

    __slots__ = ("max_entries", "max_bytes", "slot", "clock", "entries", "bytes")

    def __init__(self, max_entries: int, max_bytes: int, slot: Any,
                 clock: Callable[[], float] = monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.slot = slot
        self.clock = clock
        self.entries: OrderedDict[bytes, tuple[float, Answer]] = OrderedDict()
        self.bytes = 0

    def get(self, key: bytes) -> Answer | None:
        """The answer kept for `key` (counted as a hit), or None (a miss)."""
        found = self.entries.get(key)
        slot = self.slot
        if found is not None:
            if found[0] > self.clock():
                self.entries.move_to_end(key)
                slot[L.S_CACHE_HITS] += 1
                return found[1]
            self._drop(key, L.S_CACHE_EXPIRED)
        slot[L.S_CACHE_MISSES] += 1
        return None

    def put(self, key: bytes, answer: Answer, ttl: float) -> None:
        """Keep `answer` for `ttl` seconds, evicting the least recently used
        entries past the bounds (an answer over max_bytes alone is not kept)."""
        if answer.size > self.max_bytes:
            return
        entries = self.entries
        if key in entries:  # two identical requests missed at once: the last one wins
            self._drop(key, None)
        now = self.clock()
        entries[key] = (now + ttl, answer)
        self.bytes += answer.size
        slot = self.slot
        slot[L.S_CACHE_BYTES] += answer.size
        slot[L.S_CACHE_ENTRIES] += 1
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            old, (expires, _) = next(iter(entries.items()))
            self._drop(old, L.S_CACHE_EXPIRED if expires <= now else L.S_CACHE_EVICTIONS)

    def _drop(self, key: bytes, counter: int | None) -> None:
        _, answer = self.entries.pop(key)
        self.bytes -= answer.size
        slot = self.slot
        slot[L.S_CACHE_BYTES] -= answer.size
        slot[L.S_CACHE_ENTRIES] -= 1
        if counter is not None:
            slot[counter] += 1

    def clear(self) -> None:
        while self.entries:
            self._drop(next(iter(self.entries)), None)


class Ticket:
    """A non-streaming generation's place in the cache: the key it is kept
    under and for how long, and whether it was a hit or a miss (the
    x-neurohttp-cache header)."""

    __slots__ = ("cache", "key", "ttl", "status")

    def __init__(self, cache: ResponseCache, key: bytes, ttl: float, status: str) -> None:
        self.cache = cache
        self.key = key
        self.ttl = ttl
        self.status = status

    def keep(self, answer: Answer) -> None:
        self.cache.put(self.key, answer, self.ttl)


_FIGURES = (("hits", L.S_CACHE_HITS), ("misses", L.S_CACHE_MISSES),
            ("evictions", L.S_CACHE_EVICTIONS), ("expired", L.S_CACHE_EXPIRED))


def figures(block: StatsBlock, models: dict[str, float]) -> dict[str, Any]:
    """The /stats "cache" section: the counters summed over every slot (the
    retired one keeps dead workers' counts), bytes and entries over live
    workers; `models`: the models that cache, and their ttl."""
    _, slots = copy_consistent(block, L.S_CACHE_ENTRIES + 1)
    live = [s for i, s in enumerate(slots) if i and s[L.S_STATE] != L.STATE_FREE]
    doc: dict[str, Any] = {name: slots[0][w] + sum(s[w] for s in live) for name, w in _FIGURES}
    doc["bytes"] = sum(s[L.S_CACHE_BYTES] for s in live)
    doc["entries"] = sum(s[L.S_CACHE_ENTRIES] for s in live)
    doc["models"] = dict(models)
    return doc
