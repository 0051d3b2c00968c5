"""The token pipeline: /v1/chat (JSON, NDJSON, SSE), /v1/chat/completions
(JSON, SSE) and /v1/ws all produce their tokens here.

A `Generation` is one completion. Its tokens go provider -> stop sequences ->
the plugins' on_token filters -> the max_tokens guard -> the API's framing.
It counts usage with tiktoken into the worker's stats slot: prompt tokens
when it starts, completion tokens exactly once when it ends or is cut short.
`usage`, /stats and quotas therefore see the same numbers.

Closing the token iterator (the client went away, the server is stopping)
closes the provider's async generator. Its `finally` runs at once, so an
upstream request can be cancelled there.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable
from itertools import islice
from time import monotonic
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import BadInput, error_body, error_response
from ..messages import Request, Response, StreamingResponse
from ..stats import layout as L
from . import tokenizer
from .models import UnknownModel
from .providers import Finish

if TYPE_CHECKING:
    from ..stats.window import Meter
    from ..worker.worker import Worker

log = logging.getLogger("neurohttp")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_PING = b": ping\n\n"
BATCH = 64  # ready tokens per chunk (see Generation.frames)
COMPACT_PARTS = 1024  # a generation counts its text every this many pieces (a stream drops it)
READY_RUN = 1024  # ready tokens produced between two turns of the loop (Generation.run_now)
# The longest stop sequence accepted (characters). OpenAI documents no limit;
# real ones are a few characters ("\n\n", "</s>", "User:"). A stream holds
# back at most this much text, and matching costs O(len) per stop to set up.
MAX_STOP_CHARS = 4096

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


def provider_error(exc: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for a provider that failed. A provider may set
    `status` (e.g. 502, 503, 429) and `retry_after` on its exception."""
    status = getattr(exc, "status", None)
    if type(status) is not int or not 400 <= status <= 599:
        log.error("model provider failed: %r", exc)
        return 500, error_body(500, "the model failed to answer", type="server_error")
    return status, error_body(status, str(exc) or "the model failed to answer")


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


class _Rules:
    """The per-token rules of a generation that has stop sequences, token
    filters or max_tokens: one place, used by the ready and the async paths."""

    __slots__ = ("gen", "cutter", "limit", "n")

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.cutter = StopCutter(gen.stops) if gen.stops else None
        self.limit = gen.max_tokens
        self.n = 0

    def feed(self, tok: str) -> tuple[str | None, bool]:
        """(text to send, whether the generation ends here)."""
        text: str | None
        gen = self.gen
        self.n += 1
        if self.limit is not None and self.n > self.limit:  # the provider ignored max_tokens
            gen.finish_reason = "length"
            return None, True
        stop = False
        text = tok
        if self.cutter is not None:
            text, stop = self.cutter.feed(tok)
        if text and gen.filters:
            text = gen._filtered(text)
            if text is None:
                return None, True
        if stop:
            gen.finish_reason = "stop"
        return text, stop

    def flush(self) -> str | None:
        if self.cutter is None:
            return None
        rest = self.cutter.flush()
        return self.gen._filtered(rest) if rest and self.gen.filters else rest


class Generation:
    """One completion through the pipeline."""

    __slots__ = ("slot", "req", "model", "provider", "messages", "params", "prompt_tokens",
                 "filters", "max_tokens", "stops", "parts", "kept", "rest", "finish_reason",
                 "completion_tokens", "counted", "streaming", "tokens_before", "log_usage",
                 "meter", "started", "failed")

    def __init__(self, slot: Any, req: Request | None, model: str, provider: Any,
                 messages: list[dict[str, Any]], params: dict[str, Any], prompt_tokens: int,
                 filters: list[Callable[[Any, str], str | None]],
                 log_usage: bool = False, meter: Meter | None = None) -> None:
        self.slot = slot
        # per-model figures (stats/window.py): latency from here to finish(), errors
        self.meter = meter
        self.started = monotonic()
        self.failed = False  # the provider failed: the handler sets it before close()
        self.log_usage = log_usage  # put model and tokens in req.state for the access log
        self.req = req
        self.model = model
        self.provider = provider
        self.messages = messages
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.filters = filters
        mt = params.get("max_tokens")
        self.max_tokens: int | None = mt if type(mt) is int else None
        stop = params.get("stop")
        self.stops: list[str] | None = [s for s in stop if s] or None if stop else None
        self.parts: list[str] = []
        # Every COMPACT_PARTS pieces the text so far is counted and joined into
        # `kept`, so a long answer is never a huge list of pieces nor counted in
        # one go at the end. A stream needs only the count of what it sent, not
        # the text: it keeps nothing.
        self.kept: list[str] = []
        self.rest: Generator[str, None, None] | None = None  # ready tokens run_now left for run_to_end
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.counted = False
        self.streaming = False
        self.tokens_before = 0  # tokens of the text already counted (in `kept`, or dropped)

    # ------------------------------------------------------------ producing tokens
    def _filtered(self, tok: str) -> str | None:
        req = self.req
        for f in self.filters:
            out = f(req, tok)
            if out is None:  # a plugin stopped the stream
                self.finish_reason = "content_filter"
                return None
            tok = out
        return tok

    def ready(self) -> Generator[str, None, None] | None:
        """The tokens as a plain iterator when the provider has them all at once
        (its `tokens_now`, e.g. the unpaced echo model); None otherwise."""
        tokens_now = getattr(self.provider, "tokens_now", None)
        if tokens_now is None:
            return None
        source = tokens_now(self.messages, self.params)
        if source is None:
            return None
        return self._accept(source)

    def _accept(self, source: Iterable[Any]) -> Generator[str, None, None]:
        parts = self.parts
        if not self.stops and not self.filters:
            left = sys.maxsize if self.max_tokens is None else self.max_tokens
            for tok in source:
                if tok.__class__ is str:
                    if not left:  # the provider ignored max_tokens
                        self.finish_reason = "length"
                        return
                    left -= 1
                    if tok:
                        parts.append(tok)
                        yield tok
                elif tok.__class__ is Finish:
                    self.finish_reason = tok.reason
            return
        rules = _Rules(self)
        for tok in source:
            if tok.__class__ is not str:
                if tok.__class__ is Finish:
                    self.finish_reason = tok.reason
                continue
            text, done = rules.feed(tok)
            if text:
                parts.append(text)
                yield text
            if done:
                return
        rest = rules.flush()
        if rest:
            parts.append(rest)
            yield rest

    def run_now(self) -> bool:
        """Produce the whole completion synchronously if the provider can and it
        is short (READY_RUN tokens); a longer one is left in `rest` for
        run_to_end, which lets the loop run between slices of it."""
        it = self.ready()
        if it is None:
            return False
        for _ in islice(it, READY_RUN):
            pass
        if next(it, None) is None:
            return True
        self.rest = it
        return False

    async def tokens(self) -> AsyncGenerator[str, None]:
        """The completion's tokens as they are produced. Closing this iterator
        closes the provider's generator."""
        agen = self.provider.stream(self.messages, self.params)
        parts = self.parts
        try:
            if not self.stops and not self.filters:
                # the common case, kept lean (it runs per token); frames() has a copy
                limit = sys.maxsize if self.max_tokens is None else self.max_tokens
                n = 0
                async for tok in agen:
                    if tok.__class__ is str:
                        if tok:
                            n += 1
                            if n > limit:  # the provider ignored max_tokens
                                self.finish_reason = "length"
                                return
                            parts.append(tok)
                            if len(parts) > COMPACT_PARTS:
                                self._compact()
                            yield tok
                    elif tok.__class__ is Finish:
                        self.finish_reason = tok.reason
                return
            rules = _Rules(self)
            async for tok in agen:
                if tok.__class__ is not str:
                    if tok.__class__ is Finish:
                        self.finish_reason = tok.reason
                    continue
                text, done = rules.feed(tok)
                if text:
                    parts.append(text)
                    if len(parts) > COMPACT_PARTS:
                        self._compact()
                    yield text
                if done:
                    return
            rest = rules.flush()
            if rest:
                parts.append(rest)
                yield rest
        finally:
            await agen.aclose()

    async def frames_or_error(self, pre: bytes, post: bytes,
                              error_frame: Callable[[dict], bytes]) -> AsyncGenerator[bytes, None]:
        """frames(), except that a provider failure ends them with one error event
        (OpenAI's shape, framed by `error_frame`) and marks the generation failed:
        the caller then sends no final event."""
        frames = self.frames(pre, post)
        try:
            async for data in frames:
                yield data
        except Exception as e:
            self.failed = True
            yield error_frame(provider_error(e)[1])
        finally:
            await frames.aclose()

    async def frames(self, pre: bytes, post: bytes) -> AsyncGenerator[bytes, None]:
        """Each token framed as `pre` + the token as a JSON string + `post`.
        Tokens that all exist at once (an unpaced model) go out BATCH to a
        chunk: none waits for another, and the socket gets one write, not 64."""
        dumps = orjson.dumps
        self.streaming = True
        ready = self.ready()
        if ready is not None:
            batch: list[bytes] = []
            n = 0
            try:
                for tok in ready:
                    batch.append(pre + dumps(tok) + post)
                    if len(batch) >= BATCH:
                        yield b"".join(batch)
                        batch = []
                        n += 1
                        if len(self.parts) > COMPACT_PARTS:
                            self._compact()
                        if not n % 8:
                            await asyncio.sleep(0)  # a long instant answer shares the loop
                if batch:
                    yield b"".join(batch)
            finally:
                ready.close()
            return
        if not self.stops and not self.filters:
            # tokens()'s lean loop inlined: one async generator less per paced token
            agen = self.provider.stream(self.messages, self.params)
            parts = self.parts
            limit = sys.maxsize if self.max_tokens is None else self.max_tokens
            n = 0
            try:
                async for tok in agen:
                    if tok.__class__ is str:
                        if tok:
                            n += 1
                            if n > limit:  # the provider ignored max_tokens
                                self.finish_reason = "length"
                                return
                            parts.append(tok)
                            if len(parts) > COMPACT_PARTS:
                                self._compact()
                            yield pre + dumps(tok) + post
                    elif tok.__class__ is Finish:
                        self.finish_reason = tok.reason
            finally:
                await agen.aclose()
            return
        toks = self.tokens()
        try:
            async for tok in toks:
                yield pre + dumps(tok) + post
        finally:
            await toks.aclose()

    def _compact(self) -> None:
        """Count the text so far up to a place where counts add up (within its
        last 4 KiB) and keep it joined in `kept`, or drop it when streaming (in
        place: the token loops hold the same list)."""
        parts = self.parts
        text = "".join(parts)
        cut = tokenizer.cut(text, max(0, len(text) - 4096), len(text))
        if cut:
            head = text[:cut]
            self.tokens_before += tokenizer.count(head)
            if not self.streaming:
                self.kept.append(head)
            text = text[cut:]
        parts.clear()
        parts.append(text)

    # ------------------------------------------------------------ results
    @property
    def text(self) -> str:
        if self.kept:
            return "".join(self.kept) + "".join(self.parts)
        return "".join(self.parts)

    def finish(self) -> dict[str, int]:
        """Count the completion (once) and settle finish_reason; returns `usage`.
        Called before the last bytes of a response are sent."""
        if not self.counted:
            self.counted = True
            self.completion_tokens = n = self.tokens_before + tokenizer.count("".join(self.parts))
            self.slot[L.S_TOKENS_OUT] += n
            if self.meter is not None:
                self.meter.model_request(self.model, self.started, tokens_out=n,
                                         error=self.failed)
            if self.log_usage and self.req is not None:
                st = self.req.state
                st["model"] = self.model
                st["tokens"] = self.prompt_tokens + n
        self.finish_reason = settle_finish(self.finish_reason, self.completion_tokens,
                                           self.max_tokens)
        return usage(self.prompt_tokens, self.completion_tokens)

    def close(self, cancelled: bool = False) -> None:
        """The stream ended, maybe cut short: count what was produced."""
        if not self.counted:
            self.finish()

    async def run_to_end(self) -> Response | None:
        """Produce the whole completion (a non-stream answer from a paced model).
        None when it completed; else the provider's failure as an error
        response in OpenAI's shape, with Retry-After when the provider gave one."""
        try:
            rest = self.rest
            if rest is not None:  # what run_now left, in slices of READY_RUN tokens
                self.rest = None
                try:
                    while True:
                        await asyncio.sleep(0)
                        n = 0
                        for _ in islice(rest, READY_RUN):
                            n += 1
                        if len(self.parts) > COMPACT_PARTS:
                            self._compact()
                        if n < READY_RUN:
                            break
                finally:
                    rest.close()
            else:
                async for _ in self.tokens():
                    pass
        except Exception as e:
            self.failed = True
            self.close()
            status, err = provider_error(e)
            retry = getattr(e, "retry_after", None)
            return Response.json(err, status, {"Retry-After": str(retry)} if retry else None)
        return None


class Pipeline:
    """Per worker: the models, the token filters and the stats slot."""

    def __init__(self, ctx: Worker) -> None:
        self.slot = ctx.slot
        self.meter: Meter | None = ctx.meter  # per-model figures; the slot keeps the totals
        self.models = ctx.models
        self.default_model: tuple[str, Any] = ctx.models.get(None)  # (name, provider)
        self.filters = ctx.app.token_filters  # the live list: plugins add to it later
        self.sse_ping_s = float(ctx.cfg.server.sse_ping_s)
        self.log_usage = getattr(ctx, "access_log", None) is not None

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
              prompt_tokens: int) -> Generation:
        """A completion for a model already looked up; counts the prompt tokens."""
        self.slot[L.S_TOKENS_IN] += prompt_tokens
        if self.meter is not None:
            self.meter.tokens(name, tokens_in=prompt_tokens)
        return Generation(self.slot, req, name, provider, messages, params, prompt_tokens,
                          self.filters, self.log_usage, self.meter)

    def instant(self, provider: Any, messages: list[dict[str, Any]],
                params: dict[str, Any]) -> tuple[str, str | None] | None:
        """(text, finish_reason or None) when the provider can answer at once (the
        unpaced echo model), so a non-streamed answer needs no task and no
        Generation. Stop sequences and token filters work per token, so they
        take the token path, which keeps streamed and whole answers identical.
        The caller counts the tokens (count_out)."""
        if self.filters or params.get("stop"):
            return None
        complete_now = getattr(provider, "complete_now", None)
        if complete_now is None:
            return None
        answer = complete_now(messages, params)
        if answer is None:
            return None
        if answer.__class__ is tuple:
            return answer
        return answer, None

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

    def count_out(self, text: str) -> int:
        n = tokenizer.count(text)
        self.slot[L.S_TOKENS_OUT] += n
        return n

    def respond(self, gen: Generation, body: AsyncIterator[bytes], content_type: str,
                sse: bool, abort_event: dict) -> StreamingResponse:
        """Wrap a framed body as a streamed response with the stream hygiene:
        no-cache, no proxy buffering, `: ping` when idle (SSE), a final error
        event if the server must cut it short, usage counted however it ends."""
        if sse:
            abort = b"data: " + orjson.dumps(abort_event) + b"\n\n"
            ping = SSE_PING if self.sse_ping_s > 0 else None
        else:
            abort = orjson.dumps(abort_event) + b"\n"
            ping = None
        return StreamingResponse(body, 200, dict(SSE_HEADERS), content_type, gen.close,
                                 ping, self.sse_ping_s, abort)
