"""Model backends and what they yield: the provider contract.

A provider is an object with `stream(messages, params)` returning an async
iterator (an `async def` generator, or any object with `__anext__`) of:

- `str` (or a `str` subclass): the next piece of the answer's text;
- `Delta`: a structured piece of one choice: text, tool-call deltas, a
  refusal, logprobs, other delta fields to forward as they are, and how many
  completion tokens it is when the provider knows; with `n` > 1, the other
  choices as they came;
- `Chunk`: a whole OpenAI `chat.completion.chunk` object (a dict), handed
  over as the upstream sent it; the pipeline reads its delta, finish reason
  and usage, and forwards the rest (its other choices too);
- `Completion`: a whole answer's text as a `Chunk`, with the answer's other
  message and top-level fields to keep (a whole answer's cheap path);
- `Finish(reason)`: why the answer ended ("stop", "length", "tool_calls",
  "content_filter"); without one the server infers it;
- `Usage(prompt_tokens, completion_tokens)`: the counts an upstream
  reported; they become the generation's figures (see the pipeline);
- `ProviderError(kind, ...)`, yielded or raised: the request fails with the
  status its kind maps to (STATUS below);
- `Text(text, tokens)`: text the provider counted itself (an upstream's
  content-only chunk): the cheapest way to send it;
- `Batch([...])`: several of the above that arrived together (the events of
  one upstream read), forwarded to the client in one write.

Anything else (bytes, None, a dict...) stops the request with an error that
names the provider. A provider may also offer `complete_now(messages, params)`
(the whole text, or (text, finish_reason), when it can answer without
waiting) and `tokens_now(messages, params)` (its items as a plain iterator in
that case), which let the server answer without a task and frame ready
tokens together; and `cuts_at_max_tokens = True` when it never yields more
than `max_tokens` cl100k tokens of text itself (the built-in echo model), so
the server's own guard is skipped. More optional members, for a provider in
front of a model server (the gateway's `openai` provider):
`complete(messages, params)`, the same events for a client that wants the
whole answer (an upstream asked without streaming), used instead of
`stream()` then; `applies_stop = True` when the model applies `stop` itself
(the server does not cut the text again); `reports_usage = True` when its
`Usage` is the truth: the prompt is then charged once, with the reported
count (the server's estimate when none comes), when the generation ends;
`supports_n = True` when it answers OpenAI's `n` > 1 itself (the choices
other than 0 in `Delta.choices`, their tokens in its `Usage`; the server's
stop cutter and max_tokens guard see choice 0 only): without it,
/v1/chat/completions refuses `n` > 1 with a 400 naming `n`.
"""

from __future__ import annotations

from typing import Any


class Finish:
    """The last item a provider may yield: why the answer ended."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Finish({self.reason!r})"


STOP = Finish("stop")
LENGTH = Finish("length")


class ToolCallDelta:
    """A piece of one tool call, as OpenAI streams it in `delta.tool_calls`:
    the first piece of call `index` has its id, type and function name, the
    following ones pieces of its JSON arguments."""

    __slots__ = ("index", "id", "type", "name", "arguments")

    def __init__(self, index: int, id: str | None = None, name: str | None = None,
                 arguments: str | None = None, type: str | None = None) -> None:
        self.index = index
        self.id = id
        self.type = type if type is not None or id is None else "function"
        self.name = name
        self.arguments = arguments

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's shape: {"index", "id"?, "type"?, "function": {"name"?, "arguments"?}}."""
        d: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            d["id"] = self.id
        if self.type is not None:
            d["type"] = self.type
        fn: dict[str, str] = {}
        if self.name is not None:
            fn["name"] = self.name
        if self.arguments is not None:
            fn["arguments"] = self.arguments
        d["function"] = fn
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ToolCallDelta:
        """From OpenAI's `delta.tool_calls[i]` (ValueError if it is not that shape)."""
        if type(d) is not dict or type(d.get("index", 0)) is not int:
            raise ValueError(f"not a tool call delta: {d!r:.200}")
        fn = d.get("function") or {}
        if type(fn) is not dict:
            raise ValueError(f"not a tool call delta: {d!r:.200}")
        return cls(d.get("index", 0), _opt_str(d.get("id")), _opt_str(fn.get("name")),
                   _opt_str(fn.get("arguments")), _opt_str(d.get("type")))

    def __repr__(self) -> str:
        return (f"ToolCallDelta({self.index}, id={self.id!r}, name={self.name!r}, "
                f"arguments={self.arguments!r})")


def _opt_str(v: Any) -> str | None:
    if v is None or type(v) is str:
        return v
    raise ValueError(f"expected a string, got {type(v).__name__}")


class Delta:
    """A structured piece of the answer (one choice).

    `content`: text (it goes through stop sequences, token filters and the
    max_tokens guard like a plain `str`); `tool_calls`: ToolCallDelta pieces;
    `refusal`: refusal text; `logprobs`: the choice's logprobs object for
    this piece (OpenAI's `{"content": [...], "refusal": [...]}`); `extra`:
    other fields of the delta, forwarded as they are (e.g. an upstream's
    `reasoning_content`); `chunk`: fields of the whole chunk to forward with
    it (`system_fingerprint`, `service_tier`, ...; in a whole answer, its
    top-level fields); `tokens`: how many
    completion tokens this piece is, when the provider knows (an upstream's
    chunk is at least one: give 1; 0 defers the count to a final `Usage`);
    None counts its text with cl100k. `choices`: the other choices (index
    1..n-1, a provider that `supports_n`) as the upstream sent them: chunk
    choices ({"index", "delta", ...}) in a stream, forwarded as they are;
    whole choices ({"index", "message", ...}) in a whole answer, kept. Their
    tokens are the provider's to count (in `tokens` or its `Usage`)."""

    __slots__ = ("content", "tool_calls", "refusal", "logprobs", "extra", "chunk", "tokens",
                 "choices")

    def __init__(self, content: str | None = None, tool_calls: list[ToolCallDelta] | None = None,
                 refusal: str | None = None, logprobs: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, chunk: dict[str, Any] | None = None,
                 tokens: int | None = None, choices: list[dict[str, Any]] | None = None
                 ) -> None:
        self.content = content
        self.tool_calls = tool_calls
        self.refusal = refusal
        self.logprobs = logprobs
        self.extra = extra
        self.chunk = chunk
        self.tokens = tokens
        self.choices = choices

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__
                           if getattr(self, k) is not None)
        return f"Delta({fields})"


class Usage:
    """Token counts an upstream reported (either may be None: not reported).
    They become the generation's figures, in `usage` and in the stats."""

    __slots__ = ("prompt_tokens", "completion_tokens")

    def __init__(self, prompt_tokens: int | None = None,
                 completion_tokens: int | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens

    def __repr__(self) -> str:
        return f"Usage({self.prompt_tokens!r}, {self.completion_tokens!r})"


class Chunk:
    """A whole OpenAI `chat.completion.chunk` (the parsed JSON object), handed
    over as an upstream sent it. The pipeline takes choice 0's delta (a Delta
    with every field kept), its finish_reason and the chunk's usage; /v1/chat/
    completions forwards it with the server's id and the public model name.
    `tokens`: as a Delta's (1: the upstream's chunk is a token, its final
    usage settles the count; None: its text is counted with cl100k)."""

    __slots__ = ("data", "tokens")

    def __init__(self, data: dict[str, Any], tokens: int | None = None) -> None:
        self.data = data
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"Chunk({self.data!r:.200})"


# A chunk's fields the server writes itself (its id, the public model name,
# the choices it frames, the usage it settles): a chunk with no others has
# nothing to forward beside its delta.
CHUNK_OWN = frozenset({"id", "object", "created", "model", "choices", "usage"})


class Text:
    """A piece of text the provider has counted (`tokens` completion tokens):
    an upstream's content-only chunk, sent as text by the pipeline's cheapest
    path, charged as it streams, never tokenized again; the provider's final
    usage settles the count. The same answer as Chunk(data, tokens) of that
    chunk, without the chunk: what the `openai` provider yields for most of
    a stream's events."""

    __slots__ = ("text", "tokens")

    def __init__(self, text: str, tokens: int = 1) -> None:
        self.text = text
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"Text({self.text!r:.60}, {self.tokens})"


class Batch(list[Any]):
    """Several of the items above that arrived together (the events of one
    upstream read): the server forwards them in one write, not one each. A
    provider that yields them one by one gets the same answer, with a write
    per item."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Batch({len(self)} items)"


class Completion(Chunk):
    """A whole (non-streamed) answer whose one choice is text: the text,
    finish reason and usage as a Chunk (`data`, `tokens`), and the answer's
    other fields to keep beside them, as the upstream sent them: `message`,
    the message's fields but role, content and refusal (`annotations`,
    `reasoning_content`, ...); `top`, the top-level fields but id, object,
    created, model, choices and usage (`system_fingerprint`, ...). One event
    where a Delta, its Usage and Finish would be three: the common answer's
    cheap path (gateway/openai_provider.py)."""

    __slots__ = ("message", "top")

    def __init__(self, data: dict[str, Any], tokens: int | None = None,
                 message: dict[str, Any] | None = None, top: dict[str, Any] | None = None
                 ) -> None:
        self.data = data
        self.tokens = tokens
        self.message = message
        self.top = top


# A ProviderError's kind -> the HTTP status the client gets (DESIGN.md §4:
# 502/503/504 for upstreams). An upstream's own 401 or 404 is not the
# client's: it is `upstream_error`, a 502 (the upstream's status is kept in
# ProviderError.status for the logs).
STATUS = {
    "bad_request": 400,            # the upstream refused the request as invalid
    "rate_limited": 429,           # with Retry-After when retry_after is given
    "provider_error": 500,         # the provider itself failed (a bug, bad output)
    "upstream_error": 502,         # the upstream answered with an error (any status)
    "upstream_unreachable": 502,   # connect refused, reset, DNS: nothing answered
    "upstream_unavailable": 503,   # the upstream says it is overloaded or down (503), a breaker is open
    "upstream_timeout": 504,       # connect, first byte, idle or total timeout
}


class ProviderError(Exception):
    """A provider's failure, yielded or raised: `kind` is a key of STATUS;
    `status` the upstream's own HTTP status if any; `retry_after` seconds
    (429 and 503 send Retry-After); `param` the request field at fault (400)."""

    def __init__(self, kind: str, message: str = "", *, status: int | None = None,
                 retry_after: float | None = None, param: str | None = None) -> None:
        super().__init__(message or kind)
        self.kind = kind if kind in STATUS else "provider_error"
        self.message = message or kind.replace("_", " ")
        self.status = status
        self.retry_after = retry_after
        self.param = param

    @property
    def http_status(self) -> int:
        return STATUS[self.kind]
