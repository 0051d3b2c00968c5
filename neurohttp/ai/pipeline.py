"""The generation pipeline: /v1/chat (JSON, NDJSON, SSE), /v1/chat/completions
(JSON, SSE) and /v1/ws all produce their answers here, through one path.

A `Generation` is one completion. What its provider yields (the contract is in
ai/providers/__init__.py: text, Delta, Chunk, Finish, Usage, ProviderError)
goes through one loop, `Generation.frames` (or `run_now` for an answer that is
ready at once): text through the stop sequences, the plugins' on_token
filters and the max_tokens guard (counted in cl100k tokens), then to the
API's `Framer` (handlers/: OpenAI SSE chunks, the seed API's NDJSON or SSE,
WebSocket messages; COLLECT for a whole answer). A provider that can answer at once and has no
per-token rules to apply is answered by `Pipeline.instant`, with no
Generation at all (the hot path).

Usage goes to the worker's usage sink (context.UsageSink): the prompt's
tokens when the generation begins, completion tokens as they are produced
(the text is counted up to a place where cl100k counts add up, every
SETTLE_PARTS pieces or SETTLE_S seconds), and one report when it ends,
however it ends (finished, cut by max_tokens, cancelled, failed). The final
figures equal `usage` in the response and what was charged, exactly.

Closing the frames (the client went away, the server is stopping) closes the
provider's async iterator: its `finally` runs at once, so an upstream
request can be cancelled there.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
)
from itertools import islice
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ..context import (
    CANCELLED,
    FAILED,
    FINISHED,
    LENGTH,
    Services,
    UsageEvent,
    plugin_of,
    usage_event,
)
from ..errors import BadInput, error_body, error_response
from ..messages import Request, Response, StreamingResponse
from . import tokenizer
from .cache import HIT, MISS, Answer, ResponseCache, Ticket, deterministic, figures, request_key
from .models import UnknownModel
from .providers import (
    CHUNK_OWN,
    STATUS,
    Batch,
    Chunk,
    Completion,
    Delta,
    Finish,
    ProviderError,
    Text,
    ToolCallDelta,
    Usage,
)

if TYPE_CHECKING:
    from ..context import UsageSink

log = logging.getLogger("neurohttp")
_count = tokenizer.count

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_PING = b": ping\n\n"
BATCH = 64  # ready pieces per HTTP chunk (see Generation.frames)
YIELD_EVERY = 512  # ready pieces between two turns of the loop
READY_RUN = 1024  # ready pieces made between two turns of the loop (run_now, run_to_end)
# Completion tokens are counted and charged every SETTLE_PARTS pieces, and at
# least every SETTLE_S seconds while a stream runs (so /stats and the
# per-second figures follow the stream, and quotas are charged as it goes).
SETTLE_PARTS = 1024
SETTLE_S = 0.2
# The longest stop sequence accepted (characters). OpenAI documents no limit;
# real ones are a few characters ("\n\n", "</s>", "User:"). A stream holds
# back at most this much text, and matching costs O(len) per stop to set up.
MAX_STOP_CHARS = 4096

# The finish reasons of answers the response cache keeps (not "content_filter":
# a plugin's filter cut it, maybe for this request alone).
_KEPT = frozenset({"stop", "length", "tool_calls"})
# An upstream chunk with only these top-level fields and a choice-0 delta of
# only these is plain text (Generation._chunk's fast path): the server's own
# id, object, created and model replace the upstream's.
_PLAIN_TOP = CHUNK_OWN
_PLAIN_DELTA = frozenset({"role", "content"})


def _says(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice (n > 1) carries a piece of the answer: a delta
    with more than its role (an upstream's role and finish chunks are not)."""
    delta = choice.get("delta")
    return type(delta) is dict and any(v for k, v in delta.items() if k != "role")


# The last event of a stream the server ends at its shutdown deadline.
SHUTDOWN_ERROR = error_body(503, "the server is shutting down; the stream was cut short",
                            type="server_error", code="server_shutdown")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def settle_finish(reason: str | None, completion_tokens: int, max_tokens: int | None) -> str:
    """The finish_reason: the provider's, else "length" when max_tokens was reached."""
    if reason is not None:
        return reason
    return "length" if max_tokens is not None and completion_tokens >= max_tokens else "stop"


def parse_stop(value: Any) -> list[str]:
    """OpenAI's `stop`: a string or a list of up to 4 strings, as a list."""
    stop = [value] if type(value) is str else value
    if type(stop) is not list or len(stop) > 4 or any(type(s) is not str for s in stop):
        raise BadInput("'stop' must be a string or an array of up to 4 strings", "stop")
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise BadInput(f"'stop' sequences must be at most {MAX_STOP_CHARS} characters "
                           f"(got one of {len(s)})", "stop")
    return stop


# ---------------------------------------------------------------- failures
class BadOutput(ProviderError):
    """A provider yielded something that is not in the contract."""

    def __init__(self, message: str) -> None:
        super().__init__("provider_error", message)


class HookFailed(ProviderError):
    """A plugin's hook (on_token) raised while a generation ran: the request
    ends with a 500 (or an error event in a stream), logged once naming the
    plugin, the hook and the exception, with its traceback."""

    def __init__(self, plugin: str | None, hook: str, fn: Any, exc: BaseException) -> None:
        super().__init__("provider_error", "a plugin failed while producing the answer")
        self.plugin = plugin
        self.hook = hook
        self.fn_name = getattr(fn, "__qualname__", None) or type(fn).__name__
        self.exc = exc


class Failure:
    """A provider's failure as the client gets it: status, OpenAI error body,
    Retry-After."""

    __slots__ = ("status", "kind", "message", "retry_after", "param")

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None,
                 param: str | None = None) -> None:
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.kind, param=self.param)

    def headers(self) -> dict[str, str] | None:
        if self.retry_after is None or self.status not in (429, 503):
            return None
        return {"Retry-After": str(max(0, math.ceil(self.retry_after)))}

    def response(self, req: Request | None) -> Response:
        return error_response(req, self.status, self.message, code=self.kind, param=self.param,
                              headers=self.headers())


# Statuses an exception may carry (the contract before ProviderError: a
# `status` attribute) -> the kind it is taken for.
_LEGACY = {400: "bad_request", 429: "rate_limited", 503: "upstream_unavailable",
           504: "upstream_timeout", 408: "upstream_timeout"}


def failure_of(exc: BaseException, model: str, provider: str,
               plugin: str | None = None) -> Failure:
    """Map a provider's failure to what the client gets (DESIGN.md §4): a
    ProviderError by its kind; a timeout 504; a refused or broken connection
    502; an exception with an int `status` by that status (an upstream's own
    401 or 500 is the server's 502); anything else 500. Logged here, once."""
    where = (f"model {model!r} (provider {provider!r})" if plugin is None else
             f"model {model!r} (provider {provider!r} of plugin {plugin!r})")
    if isinstance(exc, HookFailed):
        log.error("plugin %r: %s hook %s failed in %s: %s: %s", exc.plugin, exc.hook,
                  exc.fn_name, where, type(exc.exc).__name__, exc.exc, exc_info=exc.exc)
        return Failure(500, exc.kind, exc.message)
    if isinstance(exc, ProviderError):
        if isinstance(exc, BadOutput):
            log.error("%s: %s", where, exc.message)
        else:
            log.warning("%s failed: %s: %s%s", where, exc.kind, exc.message,
                        f" (upstream status {exc.status})" if exc.status else "")
        return Failure(STATUS[exc.kind], exc.kind, exc.message, exc.retry_after, exc.param)
    if isinstance(exc, TimeoutError):
        log.warning("%s timed out", where, exc_info=exc)
        return Failure(504, "upstream_timeout", f"the model {model!r} did not answer in time")
    if isinstance(exc, ConnectionError):
        log.warning("%s could not reach its upstream: %r", where, exc)
        return Failure(502, "upstream_unreachable", f"the model {model!r} could not be reached")
    status = getattr(exc, "status", None)
    if type(status) is int and 400 <= status <= 599:
        kind = _LEGACY.get(status, "upstream_error")
        log.warning("%s failed with status %d: %r", where, status, exc)
        retry = getattr(exc, "retry_after", None)
        return Failure(STATUS[kind], kind, str(exc) or "the model failed to answer",
                       retry if isinstance(retry, (int, float)) else None)
    log.error("%s failed", where, exc_info=exc)
    return Failure(500, "provider_error", "the model failed to answer")


def _borders(s: str) -> list[int]:
    """KMP's failure function: b[i] is the length of the longest proper prefix
    of s[:i + 1] that is also its suffix."""
    b = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        c = s[i]
        while k and s[k] != c:
            k = b[k - 1]
        if s[k] == c:
            k += 1
        b[i] = k
    return b


class StopCutter:
    """Cuts the text where the first stop sequence completes (when two complete
    on the same character, before the longer one), holding back any tail that
    could still become one, so no stop text is ever sent.

    Each stop sequence has a KMP automaton whose state is the length of the
    longest suffix of the text so far that begins it: the work per token is
    linear in the token (amortised), and the text held back is at most the
    longest stop sequence minus one character."""

    __slots__ = ("stops", "borders", "states", "held")

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.borders = [_borders(s) for s in stops]
        self.states = [0] * len(stops)
        self.held = ""

    def feed(self, tok: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was reached)."""
        states = self.states
        hit = -1     # the earliest character of tok that completes a stop sequence
        hit_len = 0  # the longest stop sequence completing there
        for j, s in enumerate(self.stops):
            q, end = _advance(s, self.borders[j], states[j], tok, hit)
            states[j] = q
            if end >= 0 and (end < hit or hit < 0 or len(s) > hit_len):
                hit, hit_len = end, len(s)
        held = self.held
        if hit >= 0:  # the text ends here (were more fed, it would start afresh)
            self.held = ""
            self.states = [0] * len(states)
            return (held + tok[:hit + 1])[:len(held) + hit + 1 - hit_len], True
        keep = max(states)
        if not keep:
            self.held = ""
            return (held + tok if held else tok), False
        if keep >= len(tok):
            self.held = held[len(held) + len(tok) - keep:] + tok
            return held[:len(held) + len(tok) - keep], False
        self.held = tok[len(tok) - keep:]
        return held + tok[:len(tok) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _advance(s: str, borders: list[int], q: int, tok: str, limit: int) -> tuple[int, int]:
    """Run the automaton of stop sequence `s` from state `q` over `tok`: (its
    state after tok, the index of the character of tok that completes `s`, or -1).
    It need not look past index `limit` (another stop sequence completes there;
    -1: no limit)."""
    m = len(s)
    first = s[0]
    n = len(tok) if limit < 0 else limit + 1
    i = 0
    while i < n:
        if not q:  # nothing begun: jump to the next character that could begin s
            i = tok.find(first, i, n)
            if i < 0:
                return 0, -1
            q = 1
        else:
            c = tok[i]
            while q and s[q] != c:
                q = borders[q - 1]
            if s[q] == c:
                q += 1
        if q == m:
            return q, i
        i += 1
    return q, -1




class Framer(Protocol):
    """How one API frames a generation's output (handlers/chat.py: the seed
    API's NDJSON and SSE; handlers/ws.py: WebSocket messages;
    handlers/openai.py: OpenAI's chunks). A text piece's frame is `pre` +
    the text as a JSON string + `post`, built inline by the loop (no call
    per piece); the other frames come from the methods. `batch`: ready
    pieces joined into one frame (1: each alone); `streaming`: False for a
    whole answer (the text is kept, not dropped once counted)."""

    @property
    def batch(self) -> int: ...

    @property
    def streaming(self) -> bool: ...

    @property
    def pre(self) -> bytes: ...

    @property
    def post(self) -> bytes: ...

    def start(self, gen: Generation) -> bytes | None:
        """The first frame (OpenAI's role chunk), before any piece."""

    def delta(self, gen: Generation, d: Delta) -> bytes | None:
        """A structured piece's frame (None: nothing to send for it)."""

    def end(self, gen: Generation) -> bytes | None:
        """The last frame, after the last piece (it calls gen.finish())."""

    def error(self, gen: Generation, failure: Failure) -> bytes | None:
        """The frame that ends a generation whose provider failed."""


class _Collect:
    """The framer of a whole answer: nothing to send, the text is kept."""

    batch = READY_RUN
    streaming = False
    pre = b""
    post = b""

    def start(self, gen: Generation) -> bytes | None:
        return None

    def delta(self, gen: Generation, d: Delta) -> bytes | None:
        return None

    def end(self, gen: Generation) -> bytes | None:
        return None

    def error(self, gen: Generation, failure: Failure) -> bytes | None:
        return None


COLLECT = _Collect()


class _Rules:
    """The per-text rules of a generation that has stop sequences, token
    filters or a max_tokens to enforce itself: one place for every path."""

    __slots__ = ("gen", "cutter", "limit", "used")

    def __init__(self, gen: Generation, guard: bool) -> None:
        self.gen = gen
        self.cutter = StopCutter(gen.stops) if gen.stops else None
        self.limit = gen.max_tokens if guard else None
        self.used = 0  # completion tokens so far, estimated piece by piece (see guard)

    def text(self, tok: str, guard: bool = True) -> str | None:
        """The text to send for `tok` (None: nothing now); sets gen.done when
        the generation ends here. `guard`: count it against max_tokens (not
        when the provider counted it itself)."""
        gen = self.gen
        text: str | None = tok
        if self.cutter is not None:
            text, stop = self.cutter.feed(tok)
            if stop:
                gen.done = True
                gen.finish_reason = "stop"
        if text and gen.filters:
            text = gen._filtered(text)
            if text is None:
                gen.done = True
                return None
        if text and guard and self.limit is not None:
            text = self.guard(text)
        return text or None

    def guard(self, text: str) -> str:
        """Let `text` through as far as max_tokens allows, counted in cl100k
        tokens of the whole answer (not pieces). The sum of the pieces' own
        counts is checked first: it is cheap (short counts are cached) and
        rarely under the whole's; near the limit the exact count decides, and
        the piece that crosses it is cut on a token boundary."""
        assert self.limit is not None
        n = tokenizer.count(text)
        if self.used + n <= self.limit:
            self.used += n
            return text
        gen = self.gen
        gen._settle()
        before = gen.tokens_before + gen.other_tokens  # counted, all but the held tail
        tail = "".join(gen.parts)
        allowed = self.limit - before
        whole = tail + text
        n = tokenizer.count(whole)
        if n <= allowed:
            self.used = before + n
            return text
        gen.done = True
        gen.finish_reason = "length"
        cut = tokenizer.truncate(whole, max(0, allowed))
        return cut[len(tail):] if len(cut) > len(tail) else ""

    def counted(self, n: int) -> bool:
        """Tokens the provider counted itself (a Delta's tokens, tool calls):
        False when they go past max_tokens (the generation ends before them)."""
        if self.limit is not None and self.used + n > self.limit:
            self.gen.done = True
            self.gen.finish_reason = "length"
            return False
        self.used += n
        return True

    def flush(self) -> str | None:
        if self.cutter is None:
            return None
        rest: str | None = self.cutter.flush()
        if rest and self.gen.filters:
            rest = self.gen._filtered(rest)
        if rest and self.limit is not None:
            rest = self.guard(rest)
        return rest or None


class _ToolCall:
    """One tool call of a whole answer, put together from its deltas."""

    __slots__ = ("id", "type", "name", "arguments")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: list[str] = []
        self.arguments: list[str] = []

    def add(self, d: ToolCallDelta) -> None:
        if d.id is not None and self.id is None:
            self.id = d.id
        if d.type is not None and self.type is None:
            self.type = d.type
        if d.name:
            self.name.append(d.name)
        if d.arguments:
            self.arguments.append(d.arguments)

    def message(self) -> dict[str, Any]:
        """OpenAI's `message.tool_calls[i]`."""
        return {"id": self.id or "", "type": self.type or "function",
                "function": {"name": "".join(self.name), "arguments": "".join(self.arguments)}}


class Generation:
    """One completion through the pipeline."""

    __slots__ = ("usage_sink", "req", "model", "provider", "provider_name", "messages", "params",
                 "key", "prompt_tokens", "filters", "max_tokens", "stops", "rules", "parts",
                 "kept", "rest", "finish_reason", "completion_tokens", "tokens_before",
                 "other_tokens", "charged", "reported_prompt", "reported_completion",
                 "streaming", "started", "ttft", "done", "failure", "counted", "reported", "outcome",
                 "tool_calls", "refusal", "logprobs", "stream", "agen", "first", "exhausted", "probed",
                 "cache", "prompt_deferred", "batching", "served_by", "fields", "top",
                 "choices")

    def __init__(self, usage_sink: UsageSink, req: Request | None, model: str, provider: Any,
                 messages: list[dict[str, Any]], params: dict[str, Any], prompt_tokens: int,
                 filters: list[Callable[[Any, str], str | None]], *,
                 provider_name: str = "?", key: str | None = None, stream: bool = False) -> None:
        self.usage_sink = usage_sink
        self.started = monotonic()
        self.req = req
        self.model = model
        self.provider = provider
        self.provider_name = provider_name
        self.messages = messages
        self.params = params
        self.key = key  # the API key's name (None until [auth] keys exist)
        self.stream = stream
        # charged by Pipeline.begin; -1: not counted (a provider that reports
        # usage: _count counts the messages only if it does not say)
        self.prompt_tokens = prompt_tokens
        # a provider whose Usage is the truth: the prompt is charged at the end (_count)
        self.prompt_deferred: bool = getattr(provider, "reports_usage", False)
        self.filters = filters
        mt = params.get("max_tokens")
        self.max_tokens: int | None = mt if type(mt) is int else None
        stop = params.get("stop")
        self.stops: list[str] | None = ([s for s in stop if s] or None if stop
                                        and not getattr(provider, "applies_stop", False)
                                        else None)
        guard = self.max_tokens is not None and not getattr(provider, "cuts_at_max_tokens", False)
        self.rules: _Rules | None = (_Rules(self, guard) if self.stops or filters or guard
                                     else None)
        # The text produced and not yet counted. Every SETTLE_PARTS pieces (or
        # SETTLE_S seconds) it is counted up to a place where counts add up and
        # charged; a whole answer keeps that text joined in `kept`, a stream
        # drops it. `parts` is changed in place.
        self.parts: list[str] = []
        self.kept: list[str] = []
        self.tokens_before = 0   # tokens of the text counted so far
        self.other_tokens = 0    # tokens counted otherwise: tool calls, refusals, a Delta's own
        self.charged = 0         # completion tokens charged to the usage sink so far
        self.reported_prompt: int | None = None      # a provider's Usage
        self.reported_completion: int | None = None
        self.rest: Generator[str | Delta, None, None] | None = None  # what run_now left
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.streaming = False
        self.ttft: float | None = None
        self.done = False         # a rule ended the generation (stop, filter, max_tokens)
        self.failure: Failure | None = None
        self.counted = False      # the final figures are settled (_count)
        self.reported = False
        self.outcome: str | None = None
        # a whole answer's structured parts (None until a Delta brings one)
        self.tool_calls: dict[int, _ToolCall] | None = None
        self.refusal: list[str] | None = None
        self.logprobs: dict[str, Any] | None = None
        # ... and the upstream's fields kept as they came (_keep_fields): the
        # message's other fields, the answer's top-level fields, choices 1..n-1
        self.fields: dict[str, Any] | None = None
        self.top: dict[str, Any] | None = None
        self.choices: list[dict[str, Any]] | None = None
        # prime(): the provider's iterator, opened, and its first output
        self.agen: AsyncIterator[Any] | None = None
        self.first: str | Delta | list[str | Delta] | None = None  # (a list: from a Batch)
        self.exhausted = False
        self.probed = False  # the provider was asked for a ready answer (_ready)
        # the response cache's ticket of a non-streaming request to a model that
        # caches (Pipeline.begin); None: no cache, no x-neurohttp-cache header
        self.cache: Ticket | None = None
        self.batching = False  # inside _feed_all: charges add up for one call at its end
        self.served_by: str | None = None  # the deployment that answered (a gateway model)

    def _who(self) -> str:
        """The provider as error messages name it (with its plugin, if a plugin's)."""
        plugin = plugin_of(self.provider)
        name = f"provider {self.provider_name!r}"
        return name if plugin is None else f"{name} of plugin {plugin!r}"

    # ------------------------------------------------------------ one item
    def _filtered(self, tok: str) -> str | None:
        req = self.req
        for f in self.filters:
            try:
                out = f(req, tok)
            except Exception as e:
                raise HookFailed(plugin_of(f), "on_token", f, e) from e
            if out is None:  # a plugin stopped the stream
                self.finish_reason = "content_filter"
                return None
            tok = out
        return tok

    def _feed(self, item: Any) -> str | Delta | None:
        """One item from the provider -> what to send (text, a Delta) or None."""
        if item.__class__ is str:
            rules = self.rules
            if rules is not None:
                item = rules.text(item)
                if item is None:
                    return None
            elif not item:
                return None
            parts = self.parts
            parts.append(item)
            if len(parts) > SETTLE_PARTS:
                self._settle()
            return item
        return self._item(item)

    def _feed_all(self, batch: Batch) -> list[str | Delta]:
        """A provider's Batch -> what to send of it, in order. Its tokens are
        charged once for the batch, not per item."""
        out: list[str | Delta] = []
        feed = self._feed
        text = self._text
        charged = self.charged
        self.batching = True
        try:
            for item in batch:
                piece = (text(item.text, item.tokens) if item.__class__ is Text
                         else feed(item))
                if piece is not None:
                    out.append(piece)
                if self.done:
                    break
        finally:
            self.batching = False
            n = self.charged - charged
            if n:
                self.usage_sink.charge(self.model, self.key, 0, n)
        return out

    def _writes(self, f: Framer, pieces: list[str | Delta]) -> list[bytes]:
        """The frames of pieces that came together: one write for a framer
        that batches (HTTP bodies), one per piece for one that cannot
        (WebSocket messages, f.batch 1)."""
        pre, post = f.pre, f.post
        dumps = orjson.dumps
        out: list[bytes] = []
        for p in pieces:
            if p.__class__ is str:
                out.append(pre + dumps(p) + post)
            else:
                frame = f.delta(self, p)  # type: ignore[arg-type]
                if frame is not None:
                    out.append(frame)
        if f.batch > 1 and len(out) > 1:
            return [b"".join(out)]
        return out

    def _item(self, item: Any) -> str | Delta | None:
        """Everything but a plain str (the slow path)."""
        if item.__class__ is Text:  # (an upstream's stream: first, one test per event)
            return self._text(item.text, item.tokens)
        if item.__class__ is Chunk:
            return self._chunk(item.data, item.tokens)
        if isinstance(item, Delta):
            return self._delta(item)
        if isinstance(item, Chunk):
            if isinstance(item, Completion) and not self.streaming:
                self._keep_fields(item.message, item.top, None)
            return self._chunk(item.data, item.tokens)
        if isinstance(item, Finish):
            self.finish_reason = item.reason
            return None
        if isinstance(item, str):  # a str subclass is text, as a plain str
            return self._feed(str(item))
        if isinstance(item, Usage):
            self._usage(item.prompt_tokens, item.completion_tokens)
            return None
        if isinstance(item, ProviderError):
            raise item
        raise BadOutput(f"{self._who()} yielded {type(item).__name__}; "
                        "a provider yields str or the events of neurohttp.ai.providers "
                        "(Delta, Chunk, Finish, Usage, ProviderError)")

    def _usage(self, prompt: Any, completion: Any) -> None:
        """A provider's Usage (or a chunk's usage object): its counts, if counts."""
        if type(prompt) is int and prompt >= 0:
            self.reported_prompt = prompt
        if type(completion) is int and completion >= 0:
            self.reported_completion = completion

    def _delta(self, d: Delta) -> str | Delta | None:
        content = d.content
        if content is not None and type(content) is not str:
            if not isinstance(content, str):
                raise BadOutput(f"{self._who()} yielded a Delta whose "
                                f"content is {type(content).__name__}, not str")
            content = str(content)
        rules = self.rules
        if d.tokens is not None:
            # the provider counts this piece itself: its text is kept, not counted
            if type(d.tokens) is not int or d.tokens < 0:
                raise BadOutput(f"{self._who()} yielded a Delta whose "
                                f"tokens is {d.tokens!r}, not a count")
            if rules is not None and not rules.counted(d.tokens):
                return None
            if content and rules is not None:
                content = rules.text(content, guard=False)
            self._settle(everything=True)
            if content and not self.streaming:
                self.kept.append(content)
            self.other_tokens += d.tokens
            self._charge(d.tokens)
        elif content:
            content = self._feed(content)  # type: ignore[assignment]  # a str in, a str out
        n = 0
        if d.tool_calls:
            for tc in d.tool_calls:
                if not isinstance(tc, ToolCallDelta):
                    raise BadOutput(f"{self._who()} yielded a tool call "
                                    f"delta of type {type(tc).__name__}")
                if d.tokens is None:
                    n += ((tokenizer.count(tc.name) if tc.name else 0)
                          + (tokenizer.count(tc.arguments) if tc.arguments else 0))
        if d.refusal and d.tokens is None:
            n += tokenizer.count(d.refusal)
        if n:
            if rules is not None and not rules.counted(n):
                return None
            self.other_tokens += n
            self._charge(n)
        if not self.streaming:
            self._keep(d)
        if content is d.content:
            return d if (content or d.tool_calls or d.refusal is not None or d.logprobs
                         or d.extra or d.chunk or d.choices) else None
        # the rules changed the text: send what they let through
        if not content and not (d.tool_calls or d.refusal is not None or d.logprobs or d.extra
                                or d.choices):
            return None
        return Delta(content or None, d.tool_calls, d.refusal, d.logprobs, d.extra, d.chunk,
                     d.tokens, d.choices)

    def _keep(self, d: Delta) -> None:
        """A whole answer's tool calls, refusal, logprobs and other fields."""
        if d.extra or d.chunk or d.choices:
            self._keep_fields(d.extra, d.chunk, d.choices)
        if d.tool_calls:
            calls = self.tool_calls
            if calls is None:
                calls = self.tool_calls = {}
            for tc in d.tool_calls:
                call = calls.get(tc.index)
                if call is None:
                    call = calls[tc.index] = _ToolCall()
                call.add(tc)
        if d.refusal:
            if self.refusal is None:
                self.refusal = []
            self.refusal.append(d.refusal)
        if d.logprobs:
            if self.logprobs is None:
                self.logprobs = {}
            lp = self.logprobs
            for k, v in d.logprobs.items():
                if type(v) is list:  # the token lists are joined piece by piece
                    old = lp.get(k)
                    if type(old) is list:
                        old.extend(v)
                    else:
                        lp[k] = list(v)
                elif k not in lp:  # the rest as it first came ("refusal": null)
                    lp[k] = v

    def _keep_fields(self, message: dict[str, Any] | None, top: dict[str, Any] | None,
                     choices: list[dict[str, Any]] | None) -> None:
        """A whole answer's other fields, as the upstream sent them: message
        fields (text ones joined when they come in pieces, as a streamed
        `reasoning_content` does), top-level fields (the last one wins) and
        choices 1..n-1."""
        if message:
            fields = self.fields
            if fields is None:
                self.fields = dict(message)
            else:
                for k, v in message.items():
                    old = fields.get(k)
                    fields[k] = old + v if type(old) is str and type(v) is str else v
        if top:
            if self.top is None:
                self.top = dict(top)
            else:
                self.top.update(top)
        if choices:
            if self.choices is None:
                self.choices = []
            self.choices.extend(choices)

    def _text(self, text: Any, tokens: Any) -> str | Delta | None:
        """Text a provider counted: as _chunk's plain path does with a
        content-only chunk, or through the rules as that chunk's Delta."""
        if text.__class__ is not str or tokens.__class__ is not int or tokens < 0:
            raise BadOutput(f"{self._who()} yielded a Text whose text is not str "
                            "or whose tokens are not a count")
        if self.rules is not None:
            return self._delta(Delta(text, tokens=tokens))
        return self._counted(text, tokens) if text else None

    def _counted(self, text: str, tokens: int) -> str:
        """Text the provider counted, with no rules to apply: charged and sent
        as is (the text before it settled first, so counts add up)."""
        if self.parts:
            self._settle(everything=True)
        if not self.streaming:
            self.kept.append(text)
        self.other_tokens += tokens
        self._charge(tokens)
        return text

    def _chunk(self, data: Any, tokens: int | None = None) -> str | Delta | None:
        """A whole OpenAI chunk: choice 0's delta (every field kept), its finish
        reason, the chunk's usage and its other fields."""
        if type(data) is not dict:
            raise BadOutput(f"{self._who()} yielded a Chunk of "
                            f"{type(data).__name__}, not a dict")
        choices = data.get("choices")
        if (self.rules is None and choices.__class__ is list and len(choices) <= 1
                and data.keys() <= _PLAIN_TOP):
            # The common chunks (one choice, text or role only, or the usage
            # chunk; nothing else to keep): plain text for the framer's cheap
            # path, no Delta, no dicts built. The same figures as the Delta it
            # would be (a provider-counted piece is charged, kept for a whole
            # answer, not tokenized).
            c = choices[0] if choices else None
            delta = c.get("delta") if c.__class__ is dict else None
            if c is None or (delta.__class__ is dict and delta.keys() <= _PLAIN_DELTA
                             and not c.get("logprobs") and c.get("index", 0) == 0):
                content = delta.get("content") if delta is not None else None
                if content is None or (content.__class__ is str and (
                        tokens is None or (tokens.__class__ is int and tokens >= 0))):
                    u = data.get("usage")
                    if u.__class__ is dict:
                        self._usage(u.get("prompt_tokens"), u.get("completion_tokens"))
                    if c is None:
                        return None
                    reason = c.get("finish_reason")
                    if reason.__class__ is str:
                        self.finish_reason = reason
                    if not content:
                        return None
                    if tokens is None:
                        return self._feed(content)
                    return self._counted(content, tokens)
        u = data.get("usage")
        if type(u) is dict:
            self._usage(u.get("prompt_tokens"), u.get("completion_tokens"))
        # choice 0 goes through the pipeline; the others (n > 1) are forwarded
        # as they came
        choice = None
        others: list[dict[str, Any]] | None = None
        for c in data.get("choices") or ():
            if type(c) is not dict:
                continue
            if choice is None and c.get("index", 0) == 0:
                choice = c
            elif others is None:
                others = [c]
            else:
                others.append(c)
        if choice is None and others is None:
            return None
        top = {k: v for k, v in data.items()
               if k not in CHUNK_OWN} or None
        if choice is None:
            if tokens and not any(_says(c) for c in others):  # type: ignore[union-attr]
                tokens = 0  # a role or finish chunk is no token (as choice 0's are not)
            return self._delta(Delta(None, None, None, None, None, top, tokens, others))
        delta = choice.get("delta") or {}
        if type(delta) is not dict:
            raise BadOutput(f"{self._who()} yielded a Chunk whose delta is "
                            f"{type(delta).__name__}")
        extra = {k: v for k, v in delta.items()
                 if k not in ("role", "content", "tool_calls", "refusal")} or None
        try:
            calls = [ToolCallDelta.from_dict(t) for t in delta.get("tool_calls") or ()] or None
        except ValueError as e:
            raise BadOutput(f"{self._who()} yielded a Chunk with a bad "
                            f"tool call: {e}") from None
        out = None
        content = delta.get("content")
        refusal = delta.get("refusal")
        if (content or calls or refusal is not None or choice.get("logprobs") or extra
                or others):
            if tokens and not (content or calls or refusal or extra) and others \
                    and not any(_says(c) for c in others):
                tokens = 0
            out = self._delta(Delta(content if type(content) is str else None, calls,
                                    refusal if type(refusal) is str else None,
                                    choice.get("logprobs") or None, extra, top, tokens, others))
        reason = choice.get("finish_reason")
        if type(reason) is str:
            self.finish_reason = reason
        return out

    # ------------------------------------------------------------ counting
    def _charge(self, n: int) -> None:
        if n > 0:
            self.charged += n
            if not self.batching:  # (_feed_all charges a batch's tokens at its end)
                self.usage_sink.charge(self.model, self.key, 0, n)

    def _settle(self, everything: bool = False) -> None:
        """Count the text so far up to a place where counts add up (all of it
        with `everything`), charge those tokens and keep the text joined in
        `kept` (a whole answer) or drop it (a stream)."""
        parts = self.parts
        if not parts:
            return
        text = parts[0] if len(parts) == 1 else "".join(parts)
        cut = len(text) if everything else tokenizer.settle_point(text)
        parts.clear()
        if cut < len(text):
            parts.append(text[cut:])
        if cut:
            head = text[:cut] if cut < len(text) else text
            n = tokenizer.count(head)
            self.tokens_before += n
            if not self.streaming:
                self.kept.append(head)
            self._charge(n)

    # ------------------------------------------------------------ producing
    def _ready(self) -> Generator[str | Delta, None, None] | None:
        """What the provider has at once (its `tokens_now`, e.g. the unpaced echo
        model), through the rules, as a plain iterator; None if it has nothing
        ready."""
        rest = self.rest
        if rest is not None:
            self.rest = None
            return rest
        if self.probed:
            return None
        self.probed = True
        tokens_now = getattr(self.provider, "tokens_now", None)
        if tokens_now is None:
            return None
        source = tokens_now(self.messages, self.params)
        if source is None:
            return None
        self.ttft = monotonic() - self.started
        return self._through(source)

    def _through(self, source: Iterable[Any]) -> Generator[str | Delta, None, None]:
        feed = self._feed
        if self.rules is None:
            # _feed's plain-text case inlined: this loop runs per ready piece
            # (an unpaced stream), and a call per piece costs ~15% of it
            # (settling is checked by the callers, per batch: frames, run_now)
            parts = self.parts
            for item in source:
                if item.__class__ is str:
                    if item:
                        parts.append(item)
                        yield item
                    continue
                out = feed(item)
                if out is not None:
                    yield out
                if self.done:
                    return
            return
        for item in source:
            out = feed(item)
            if out is not None:
                yield out
            if self.done:
                return

    def _open(self) -> AsyncIterator[Any]:
        complete = None if self.stream else getattr(self.provider, "complete", None)
        if complete is not None:  # a whole answer from a provider that has one
            it = complete(self.messages, self.params)
        else:
            it = self.provider.stream(self.messages, self.params)
        aiter = getattr(it, "__aiter__", None)
        if aiter is None:
            raise BadOutput(f"{self._who()}: stream() returned "
                            f"{type(it).__name__}, not an async iterator")
        return it if hasattr(it, "__anext__") else aiter()

    def ready(self) -> bool:
        """Whether the provider has the answer at once (then frames() needs no
        priming: nothing can fail before the first piece but the provider's
        own bugs)."""
        if self.rest is None:
            self.rest = self._ready()
        return self.rest is not None

    async def prime(self) -> bool:
        """Open the provider and wait for its first output, so that a failure
        before any byte is sent is answered with its own status (429 with
        Retry-After, 502, 504...) rather than inside a 200 stream. False: it
        failed (see `failure`; reported)."""
        try:
            agen = self.agen = self._open()
            feed = self._feed
            async for item in agen:
                out = feed(item) if item.__class__ is not Batch else self._feed_all(item) or None
                if out is not None:
                    self.ttft = monotonic() - self.started
                    self.first = out
                    return True
                if self.done:
                    return True
            self.exhausted = True
            return True
        except Exception as e:
            await self._aclose()
            self.fail(e)
            return False
        except BaseException:
            await self._aclose()
            self.close(True)
            raise

    async def _aclose(self) -> None:
        agen = self.agen
        if agen is not None:
            self.agen = None
            self.served_by = getattr(agen, "served_by", None)  # (a gateway model's deployment)
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

    async def frames(self, f: Framer) -> AsyncGenerator[bytes, None]:
        """The generation, framed by `f`: the one loop every stream, WebSocket
        answer and paced whole answer goes through. Ready pieces (an unpaced
        model) go out f.batch to a frame, none waiting for another, with the
        loop let run every YIELD_EVERY of them. A provider's failure ends the
        frames with f.error(); cancelling or closing them closes the provider."""
        self.streaming = f.streaming
        pre, post = f.pre, f.post
        dumps = orjson.dumps
        try:
            ready = self._ready()
            start = f.start(self)
            if ready is not None:
                size = f.batch
                every = max(1, YIELD_EVERY // size)
                batch: list[bytes] = [] if start is None else [start]
                n = 0
                try:
                    for out in ready:
                        if out.__class__ is str:
                            batch.append(pre + dumps(out) + post)
                        else:
                            frame = f.delta(self, out)  # type: ignore[arg-type]
                            if frame is None:
                                continue
                            batch.append(frame)
                        if len(batch) >= size:
                            yield b"".join(batch)
                            batch = []
                            n += 1
                            if len(self.parts) > SETTLE_PARTS:
                                self._settle()
                            if not n % every:
                                await asyncio.sleep(0)  # a long ready answer shares the loop
                    if batch:
                        yield b"".join(batch)
                finally:
                    ready.close()
            else:
                if start is not None:
                    yield start
                agen = self.agen
                if agen is None:  # not primed
                    agen = self.agen = self._open()
                else:
                    first = self.first
                    if first is not None:
                        self.first = None
                        if first.__class__ is str:
                            yield pre + dumps(first) + post
                        elif first.__class__ is list:
                            for data in self._writes(f, first):
                                yield data
                        else:
                            frame = f.delta(self, first)  # type: ignore[arg-type]
                            if frame is not None:
                                yield frame
                if not (self.exhausted or self.done):
                    feed = self._feed
                    settle_at = self.started + SETTLE_S
                    try:
                        async for item in agen:
                            if item.__class__ is Batch:  # the events of one upstream read
                                pieces = self._feed_all(item)
                                if pieces:
                                    if self.ttft is None:
                                        self.ttft = monotonic() - self.started
                                    for data in self._writes(f, pieces):
                                        yield data
                                piece = None
                            else:
                                piece = feed(item)
                            if piece is not None:
                                if self.ttft is None:
                                    self.ttft = monotonic() - self.started
                                if piece.__class__ is str:
                                    yield pre + dumps(piece) + post
                                else:
                                    frame = f.delta(self, piece)  # type: ignore[arg-type]
                                    if frame is not None:
                                        yield frame
                            if self.done:
                                break
                            t = monotonic()
                            if t > settle_at:  # charge what was sent so far
                                settle_at = t + SETTLE_S
                                self._settle()
                    finally:
                        await self._aclose()
                else:
                    await self._aclose()
            if self.rules is not None and not self.done:
                rest = self.rules.flush()
                if rest:
                    self.parts.append(rest)
                    yield pre + dumps(rest) + post
            last = f.end(self)
            if last is not None:
                yield last
        except Exception as e:
            failure = self.fail(e)
            frame = f.error(self, failure)
            if frame is not None:
                yield frame
        except BaseException:
            self.close(True)  # cancelled, or the frames were closed: count what was made
            raise

    def run_now(self) -> bool:
        """Produce a whole answer synchronously if the provider has it ready and
        it is short (READY_RUN pieces): True when done (answered or failed: see
        `failure`). A longer one is left in `rest` for run_to_end, which lets
        the loop run between slices of it."""
        try:
            it = self._ready()
            if it is None:
                return False
            for _ in islice(it, READY_RUN):
                pass
            if len(self.parts) > SETTLE_PARTS:
                self._settle()
            if next(it, None) is None:
                if self.rules is not None and not self.done:
                    rest = self.rules.flush()
                    if rest:
                        self.parts.append(rest)
                return True
            self.rest = it
            return False
        except Exception as e:
            self.fail(e)
            return True

    async def run_to_end(self) -> None:
        """Produce a whole answer from a paced model (or what run_now left);
        a failure is in `failure`, a cancellation counts what was made."""
        if self.rest is not None or not self.probed or self.agen is not None:
            async for _ in self.frames(COLLECT):
                pass
            return
        # Nothing was ready (an upstream's answer): the provider's events are fed
        # here, as frames(COLLECT) would, without a frames layer to resume per
        # event nor a frame made per piece only to be dropped.
        self.streaming = False
        try:
            agen = self.agen = self._open()
            feed = self._feed
            settle_at = self.started + SETTLE_S
            try:
                async for item in agen:
                    out = feed(item) if item.__class__ is not Batch else self._feed_all(item)
                    if out and self.ttft is None:
                        self.ttft = monotonic() - self.started
                    if self.done:
                        break
                    t = monotonic()
                    if t > settle_at:
                        settle_at = t + SETTLE_S
                        self._settle()
                else:  # it ended: nothing to close
                    self.served_by = getattr(agen, "served_by", None)
                    self.agen = None
            finally:
                await self._aclose()
            if self.rules is not None and not self.done:
                rest = self.rules.flush()
                if rest:
                    self.parts.append(rest)
        except Exception as e:
            self.fail(e)
        except BaseException:
            self.close(True)
            raise

    # ------------------------------------------------------------ results
    @property
    def text(self) -> str:
        if self.kept:
            return "".join(self.kept) + "".join(self.parts)
        return "".join(self.parts)

    def message_extras(self) -> dict[str, Any]:
        """A whole answer's tool_calls and refusal, in OpenAI's message shape."""
        out: dict[str, Any] = {}
        if self.tool_calls:
            out["tool_calls"] = [self.tool_calls[i].message() for i in sorted(self.tool_calls)]
        if self.refusal:
            out["refusal"] = "".join(self.refusal)
        return out

    def _count(self) -> tuple[int, int] | None:
        """Settle the figures (once): the tail of the text counted and charged;
        an upstream's reported counts taken, never below what was charged (the
        counters only go up), so usage == what was charged, exactly. Returns
        what a provider that reports usage still owes, (prompt, completion)
        tokens, for _report to charge with its report (one sink call)."""
        if self.counted:
            return None
        self.counted = True
        more = 0  # completion tokens still to charge
        if self.reported_completion is not None:
            # the provider's count replaces the server's: the text not counted
            # yet stays uncounted (it is still in `parts` for `text`)
            completion = max(self.reported_completion, self.charged)
            more = completion - self.charged
        else:
            self._settle(everything=True)
            completion = self.tokens_before + self.other_tokens
        self.completion_tokens = completion
        if self.prompt_deferred:
            # the prompt is charged at the end, with the provider's own count if it
            # gave one, together with the last completion tokens (one charge)
            if self.reported_prompt is not None:
                self.prompt_tokens = self.reported_prompt
            elif self.prompt_tokens < 0:  # left to the provider, which did not count it
                self.prompt_tokens = tokenizer.count_messages(self.messages)
            self.charged += more
            return self.prompt_tokens, more
        self._charge(more)
        if self.reported_prompt is not None and self.reported_prompt > self.prompt_tokens:
            self.usage_sink.charge(self.model, self.key, self.reported_prompt - self.prompt_tokens)
            self.prompt_tokens = self.reported_prompt
        return None

    def finish(self) -> dict[str, int]:
        """Count the completion and settle finish_reason; returns `usage`.
        Called before the last bytes of a response are sent; reports once."""
        owed = self._count()
        if self.finish_reason is None and self.tool_calls:
            self.finish_reason = "tool_calls"
        self.finish_reason = settle_finish(self.finish_reason, self.completion_tokens,
                                           self.max_tokens)
        ticket = self.cache
        if ticket is not None and not self.reported and ticket.status is MISS \
                and self.finish_reason in _KEPT:
            # a whole answer that ended well is kept (once: finish reports once)
            ticket.keep(Answer(self.text, self.finish_reason, self.message_extras() or None,
                               self.logprobs, self.reported_prompt, self.completion_tokens,
                               self.fields, self.top, self.choices))
        self._report(LENGTH if self.finish_reason == "length" else FINISHED, owed)
        return usage(self.prompt_tokens, self.completion_tokens)

    def fail(self, exc: BaseException) -> Failure:
        """The provider failed: map it (logged once), count what was made, report."""
        if self.failure is None:
            self.failure = failure_of(exc, self.model, self.provider_name,
                                      plugin_of(self.provider))
        self._report(FAILED, self._count())
        return self.failure

    def close(self, cancelled: bool = False) -> None:
        """The stream ended, maybe cut short (StreamingResponse.on_close): count
        what was produced and report, if nothing did yet."""
        if self.reported:
            return
        if cancelled:
            self._report(CANCELLED, self._count())
        else:
            self.finish()

    def _report(self, outcome: str, owed: tuple[int, int] | None = None) -> None:
        """Report once; `owed`: what _count left to charge with the report."""
        if self.reported:
            return
        self.reported = True
        self.outcome = outcome
        t = monotonic()
        failure = self.failure
        self.usage_sink.report(usage_event(
            self.model, self.key, self.prompt_tokens, self.completion_tokens,
            t - self.started, self.ttft, outcome, self.finish_reason,
            failure.kind if failure is not None else None, self.stream,
            self.cache is not None and self.cache.status is HIT, self.served_by),
            self.req, self.started, owed)


class _Replay(Generation):
    """A cache hit: the kept answer, as a whole generation that is done at once.
    Its tokens are charged and reported like the answer it repeats (the
    prompt's as this request counted them, or as the provider reported them;
    the completion's as kept), so quotas, /stats and the access log see a hit
    as usage, marked cached in its UsageEvent."""

    __slots__ = ("answer",)

    def __init__(self, usage_sink: UsageSink, req: Request | None, model: str,
                 messages: list[dict[str, Any]], params: dict[str, Any], prompt_tokens: int,
                 answer: Answer, ticket: Ticket, provider_name: str, key: str | None) -> None:
        super().__init__(usage_sink, req, model, None, messages, params, prompt_tokens, [],
                         provider_name=provider_name, key=key)
        self.answer = answer
        self.cache = ticket
        self.parts.append(answer.text)
        self.reported_prompt = answer.prompt_tokens
        self.reported_completion = answer.completion_tokens
        self.finish_reason = answer.finish_reason
        self.logprobs = answer.logprobs
        self.fields = answer.fields
        self.top = answer.top
        self.choices = answer.choices
        self.ttft = 0.0

    def run_now(self) -> bool:
        return True

    async def run_to_end(self) -> None:
        return None

    def message_extras(self) -> dict[str, Any]:
        extras = self.answer.extras
        return dict(extras) if extras else {}


def _nothing_now(messages: list[dict[str, Any]], params: dict[str, Any]) -> None:
    """complete_now of a model that caches, or that has none: its answers take
    Pipeline.begin."""
    return None


class Pipeline:
    """Per worker: the models, the token filters and the usage sink."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.usage_sink = services.usage
        self.models = services.models
        self.default_model: tuple[str, Any] = services.models.get(None)  # (name, provider)
        self.filters = services.filters  # the live list: plugins add to it later
        self.sse_ping_s = float(services.settings.sse_ping_s)
        self.clock = services.clock
        self._instant: dict[tuple[str, str | None, int, str, str | None, int | None],
                            tuple[str, UsageEvent]] = {}
        # each model's provider.complete_now (a bound method: looked up once)
        self._complete_now: dict[str, Callable[..., Any]] = {}
        # The response cache (ai/cache.py): model -> (ttl, cache_nondeterministic)
        # for the models that set cache_ttl_s; None when none does. Their
        # complete_now is "nothing at once", so `instant` gives way to `begin`,
        # which looks the cache up: the other models' fast path is unchanged.
        self.cache_models: dict[str, tuple[float, bool]] = getattr(self.models, "cache", None) \
            or {}
        self.cache: ResponseCache | None = None
        if self.cache_models:
            st = services.settings
            self.cache = ResponseCache(st.cache_max_entries, st.cache_max_bytes,
                                       services.counters.slot)
            for name in self.cache_models:
                self._complete_now[name] = _nothing_now
        if services.stats is not None:
            ttls = {name: ttl for name, (ttl, _) in self.cache_models.items()}
            block = services.stats.block
            services.stats.add_section("cache", lambda: figures(block, ttls))

    def find_model(self, req: Request, model: str | None) -> tuple[str, Any] | Response:
        """(public name, provider) for `model` (None: the default), or the 404
        OpenAI's SDKs map to NotFoundError."""
        try:
            return self.models.get(model)
        except UnknownModel:
            return error_response(req, 404, f"The model '{model}' does not exist",
                                  code="model_not_found", param="model")

    def begin(self, req: Request | None, name: str, provider: Any,
              messages: list[dict[str, Any]], params: dict[str, Any],
              prompt_tokens: int, key: str | None = None, stream: bool = False) -> Generation:
        """A completion for a model already looked up; charges the prompt tokens
        (to the request's API key, when it was admitted with one). A provider
        that reports usage is charged at the end; its `prompt_tokens` may be -1
        (not counted: Generation._count counts it if the provider does not)."""
        if key is None and req is not None and req.key is not None:
            key = req.key.name
        if not getattr(provider, "reports_usage", False):  # (else charged when it ends)
            self.usage_sink.charge(name, key, prompt_tokens)
        if not stream and self.cache is not None:
            policy = self.cache_models.get(name)
            if policy is not None and (policy[1] or deterministic(params)):
                return self._cached(req, name, provider, messages, params, prompt_tokens, key,
                                    policy[0])
        return Generation(self.usage_sink, req, name, provider, messages, params, prompt_tokens,
                          self.filters, provider_name=self.models.provider_name(name), key=key,
                          stream=stream)

    def _cached(self, req: Request | None, name: str, provider: Any,
                messages: list[dict[str, Any]], params: dict[str, Any], prompt_tokens: int,
                key: str | None, ttl: float) -> Generation:
        """A non-streaming generation of a model that caches: the kept answer
        (a hit), or a generation that keeps its answer if it ends well (a miss)."""
        assert self.cache is not None
        if prompt_tokens < 0:  # left to the provider: a hit needs it now
            prompt_tokens = tokenizer.count_messages(messages)
        ck = request_key(name, key, messages, params)
        answer = self.cache.get(ck)
        pname = self.models.provider_name(name)
        if answer is not None:
            if getattr(provider, "reports_usage", False):
                # the upstream's own prompt count, charged now (begin left it to the end)
                if answer.prompt_tokens is not None:
                    prompt_tokens = answer.prompt_tokens
                self.usage_sink.charge(name, key, prompt_tokens)
            return _Replay(self.usage_sink, req, name, messages, params, prompt_tokens, answer,
                           Ticket(self.cache, ck, ttl, HIT), pname, key)
        gen = Generation(self.usage_sink, req, name, provider, messages, params, prompt_tokens,
                         self.filters, provider_name=pname, key=key)
        gen.cache = Ticket(self.cache, ck, ttl, MISS)
        return gen

    def instant(self, req: Request | None, name: str, provider: Any,
                messages: list[dict[str, Any]], params: dict[str, Any], prompt_tokens: int,
                key: str | None = None) -> tuple[str, UsageEvent] | None:
        """The whole answer and its usage (charged and reported) when the provider
        can answer at once (the unpaced echo model): no Generation, no task.
        None when it cannot, or when stop sequences or token filters apply:
        those work per piece, so they take the Generation's path, which keeps
        streamed and whole answers identical."""
        if self.filters or "stop" in params:
            return None
        complete_now = self._complete_now.get(name)
        if complete_now is None:
            # looked up once per model; one that has none (an upstream's) answers
            # "nothing at once" from then on, without the getattr
            complete_now = getattr(provider, "complete_now", None) or _nothing_now
            self._complete_now[name] = complete_now
        answer = complete_now(messages, params)
        if answer is None:
            return None
        if answer.__class__ is str:
            text, finish = answer, None
        else:
            text, finish = answer
        if key is None and req is not None and req.key is not None:
            key = req.key.name  # the request's API key, charged and named in the event
        # Answers made at once repeat: their final text and usage event are
        # kept per (model, key, prompt tokens, text, finish, max_tokens), so the
        # hot path counts nothing and builds no event.
        mt = params.get("max_tokens") if params else None
        ck = (name, key, prompt_tokens, text, finish, mt)
        done = self._instant.get(ck)
        if done is None:
            done = self._instant_answer(name, key, prompt_tokens, text, finish, mt)
            if len(text) <= 256:
                if len(self._instant) >= 1024:
                    self._instant.clear()
                self._instant[ck] = done
        self.usage_sink.instant(done[1], req)
        return done

    def _instant_answer(self, name: str, key: str | None, prompt_tokens: int, text: str,
                        finish: str | None, mt: int | None) -> tuple[str, UsageEvent]:
        completion = _count(text)
        if mt is not None and completion >= mt:
            if completion > mt:  # the provider ignored max_tokens
                text = tokenizer.truncate(text, mt)
                completion = _count(text)
                finish = "length"
            elif finish is None:
                finish = "length"
        finish = finish or "stop"
        return text, usage_event(name, key, prompt_tokens, completion, 0.0, 0.0,
                                LENGTH if finish == "length" else FINISHED, finish)

    def max_tokens_error(self, name: str, params: dict[str, Any],
                         param: str = "max_tokens") -> BadInput | None:
        """The 400 for a max_tokens over the model's max_output_tokens (in the
        words OpenAI uses for it), or None. `param`: the field the client used."""
        mt = params.get("max_tokens")
        ceiling = self.models.max_output_tokens.get(name)
        if mt is None or ceiling is None or mt <= ceiling:
            return None
        return BadInput(f"{param} is too large: {mt}. This model supports at most {ceiling} "
                        f"completion tokens, whereas you provided {mt}.", param)

    def respond(self, req: Request | None, gen: Generation, framer: Framer,
                content_type: str, sse: bool
                ) -> StreamingResponse | Awaitable[Response | StreamingResponse]:
        """The generation as a streamed response, with the stream hygiene:
        no-cache, no proxy buffering, `: ping` when idle (SSE), a final error
        event if the server must cut it short, usage reported however it ends.
        A provider that is not ready at once is primed first (an awaitable is
        returned): if it fails before its first output, the answer is an error
        with the failure's own status instead of a stream."""
        if gen.ready():
            return self._streaming(gen, framer, content_type, sse)
        return self._primed(req, gen, framer, content_type, sse)

    async def _primed(self, req: Request | None, gen: Generation, framer: Framer,
                      content_type: str, sse: bool) -> Response | StreamingResponse:
        if not await gen.prime():
            assert gen.failure is not None
            return gen.failure.response(req)
        return self._streaming(gen, framer, content_type, sse)

    def _streaming(self, gen: Generation, framer: Framer, content_type: str,
                   sse: bool) -> StreamingResponse:
        if sse:
            abort = b"data: " + orjson.dumps(SHUTDOWN_ERROR) + b"\n\n"
            ping = SSE_PING if self.sse_ping_s > 0 else None
        else:
            abort = orjson.dumps(SHUTDOWN_ERROR) + b"\n"
            ping = None
        return StreamingResponse(gen.frames(framer), 200, dict(SSE_HEADERS), content_type,
                                 gen.close, ping, self.sse_ping_s, abort)
