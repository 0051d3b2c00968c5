"""The `openai` provider: a public model served by OpenAI-compatible upstreams
(OpenAI, Groq, vLLM, Ollama, llama.cpp's server, ...), inside the worker's
loop, over the worker's pooled upstream client (neurohttp/upstream/).

The request goes upstream as the client sent it: every field the server does
not act on (tools, tool_choice, response_format, seed, logprobs, user, ...)
unchanged, `model` rewritten to the deployment's own name, `stop` and
`max_tokens` (or `max_completion_tokens`, under the name the client used)
passed for the upstream to apply. A streaming request asks the upstream for
`stream_options.include_usage`; the usage chunk that brings is taken for the
exact counts and not forwarded unless the client asked for it (the frames
decide: handlers/openai.py).

Stream: each upstream event becomes one `Chunk` (the parsed chunk, every
field kept: tool-call deltas, refusals, logprobs, finish reasons), yielded as
it arrives (the events of one upstream read together, as a `Batch`, so they
leave in one client write); the pipeline forwards it with the server's id
and the public model name. Each chunk that carries a delta counts as one completion token
while it streams (so quotas and per-second figures follow the stream); the
upstream's usage replaces those counts at the end. An upstream that reports
no usage has its text counted with cl100k instead.

Whole answer (`complete`, used when the client does not stream): one
non-streaming upstream request; its message becomes one Delta (content, tool
calls, refusal, logprobs, and every other message field, top-level field and
choice 1..n-1 as the upstream sent them), then its Usage and Finish; a
text-only answer one Chunk (or a Completion, with the fields to keep).

`n` > 1 (`supports_n`): passed on like any field; choices 1..n-1 travel in
`Delta.choices` (the pipeline takes choice 0 only), forwarded as they came.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from time import monotonic
from typing import Any

import orjson

from ..ai import tokenizer
from ..ai.providers import (
    CHUNK_OWN,
    Batch,
    Chunk,
    Completion,
    Delta,
    Finish,
    Text,
    ToolCallDelta,
    Usage,
)
from ..shared.deployments import config_fingerprints
from ..upstream import UpstreamClient, UpstreamError
from .deployment import Deployment
from .errors import AttemptError, bad_event, from_status, from_upstream, no_key
from .figures import DeploymentFigures
from .router import Attempt, Router

MAX_ERROR_BODY = 65536          # an upstream's error body read for its message
MAX_WHOLE_BODY = 64 << 20       # a non-streamed upstream answer larger than this is refused


class OpenAIProvider:
    # The upstream applies max_tokens and stop itself (they are passed on): the
    # pipeline's own guard and stop cutter would only hold text back.
    cuts_at_max_tokens = True
    applies_stop = True
    # The upstream's usage is the generation's: the prompt is charged at the
    # end with its count, not the server's estimate (ai/pipeline.py).
    reports_usage = True
    # `n` > 1 reaches the upstream, and every choice it returns reaches the
    # client (Delta.choices; its usage covers them all)
    supports_n = True

    def __init__(self, name: str, table: dict[str, Any], client: UpstreamClient,
                 figures: Any = None) -> None:
        self.name = name
        self.deployments = [Deployment(name, i, t, client)
                            for i, t in enumerate(table["deployments"])]
        identities = config_fingerprints({name: table})[1]  # what the master assigned by
        for dep in self.deployments:
            dep.identity = identities[(name, dep.index)]
            dep.figures = DeploymentFigures(dep, figures)
        self.router = Router(name, self.deployments, table)

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.name} {len(self.deployments)} deployments>"

    # ------------------------------------------------------------ the provider contract
    def stream(self, messages: list[dict[str, Any]], params: dict[str, Any]
               ) -> AsyncIterator[Any]:
        return self.router.stream(self.attempt(messages, params, False),
                                  self.router.fallbacks(messages, params, False))

    def complete(self, messages: list[dict[str, Any]], params: dict[str, Any]
                 ) -> AsyncIterator[Any]:
        return self.router.stream(self.attempt(messages, params, True),
                                  self.router.fallbacks(messages, params, True))

    def attempt(self, messages: list[dict[str, Any]], params: dict[str, Any], whole: bool
                ) -> Attempt:
        """The request on one deployment (the router's `attempt`; also what a
        model that falls back to this one sends)."""
        body = _body(messages, params, not whole)
        if whole:
            return lambda dep: self._whole(dep, body)
        return lambda dep: self._stream(dep, body)

    # ------------------------------------------------------------ one attempt
    async def _send(self, dep: Deployment, body: dict[str, Any]) -> Any:
        """The upstream's 200 response (its head); AttemptError otherwise."""
        headers = dep.headers
        if headers is None:
            raise no_key(dep)
        payload = orjson.dumps({"model": dep.upstream, **body})
        try:
            resp = await dep.pool.request("POST", dep.target, headers=headers, body=payload)
        except UpstreamError as e:
            raise from_upstream(dep, e, started=False) from None
        status = resp.status
        if status != 200:
            try:
                raw = await resp.read(MAX_ERROR_BODY)
            except UpstreamError:
                raw = b""
            finally:
                resp.close()
            raise from_status(dep, status, resp.retry_after if status in (429, 503) else None,
                              _error_message(raw))
        return resp

    async def _stream(self, dep: Deployment, body: dict[str, Any]) -> AsyncIterator[Any]:
        fig = dep.figures
        t0 = monotonic()
        ttfb: float | None = None
        fail: AttemptError | None = None
        usage: Any = None
        texts: list[str] = []
        sent = False  # an event was yielded: a failure now is past the first byte
        try:
            resp = await self._send(dep, body)
            try:
                loads = orjson.loads
                # The events of one upstream read go on as one Batch (one client
                # write); a lone event as itself (a paced stream: no list built).
                async for evs in resp.sse_batches():
                    if ttfb is None:
                        ttfb = monotonic() - t0
                    out: list[Any] = []
                    bad: AttemptError | None = None
                    for ev in evs:
                        if ev.done:
                            break
                        try:
                            data = loads(ev.data)
                        except orjson.JSONDecodeError:
                            bad = bad_event(dep, "the upstream sent an event that is not JSON",
                                            sent or bool(out))
                            break
                        if data.__class__ is not dict:
                            bad = bad_event(dep, "the upstream sent an event that is not "
                                            "an object", sent or bool(out))
                            break
                        if "error" in data:
                            bad = _stream_error(dep, data["error"], sent or bool(out))
                            break
                        u = data.get("usage")
                        if u:
                            usage = u
                        choices = data.get("choices")
                        if choices:
                            c0 = choices[0]
                            if c0.__class__ is dict:
                                d = c0.get("delta")
                                if d.__class__ is dict:
                                    text = d.get("content")
                                    if text and text.__class__ is str:
                                        texts.append(text)
                                        # most events: one choice's text and nothing
                                        # else to forward (its role at most), not the
                                        # last: the text alone (Text), no chunk to check
                                        if (not u and len(choices) == 1
                                                and (len(d) == 1 or (len(d) == 2 and "role" in d))
                                                and c0.get("finish_reason") is None
                                                and not c0.get("logprobs")
                                                and c0.get("index", 0) == 0
                                                and data.keys() <= CHUNK_OWN):
                                            out.append(Text(text))
                                            continue
                        out.append(Chunk(data, 1))
                    if out:
                        sent = True
                        yield out[0] if len(out) == 1 else Batch(out)
                    if bad is not None:
                        raise bad
            except UpstreamError as e:
                raise from_upstream(dep, e, started=sent) from None
            finally:
                resp.close()
            if usage is None and texts:  # no usage from the upstream: count the text
                yield Usage(None, tokenizer.count("".join(texts)))
        except AttemptError as e:
            fail = e
            raise
        finally:
            fig.attempt(t0, ttfb, fail, usage)

    async def _whole(self, dep: Deployment, body: dict[str, Any]) -> AsyncIterator[Any]:
        fig = dep.figures
        t0 = monotonic()
        ttfb: float | None = None
        fail: AttemptError | None = None
        usage: Any = None
        try:
            resp = await self._send(dep, body)
            ttfb = monotonic() - t0
            try:
                doc = await resp.json(MAX_WHOLE_BODY)
            except UpstreamError as e:
                raise from_upstream(dep, e, started=False) from None
            except orjson.JSONDecodeError:
                raise bad_event(dep, "the upstream's answer is not JSON", False) from None
            finally:
                resp.close()
            for item in _whole_events(dep, doc):
                if item.__class__ is Usage or isinstance(item, Chunk):  # (or a Completion)
                    usage = doc.get("usage")
                yield item
        except AttemptError as e:
            fail = e
            raise
        finally:
            fig.attempt(t0, ttfb, fail, usage)


def _body(messages: list[dict[str, Any]], params: dict[str, Any], stream: bool
          ) -> dict[str, Any]:
    """The upstream request but its model: the client's fields as they came."""
    body: dict[str, Any] = {"messages": messages}
    if params:
        body.update(params)
        if "max_completion_tokens" in params:  # the client's name for it, not both
            del body["max_tokens"]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _error_message(raw: bytes) -> str | None:
    """The message of an OpenAI-shaped error body, if it is one."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    err = doc.get("error") if type(doc) is dict else None
    msg = err.get("message") if type(err) is dict else err if type(err) is str else None
    return msg if type(msg) is str else None


def _stream_error(dep: Deployment, err: Any, started: bool) -> AttemptError:
    """An error event inside a 200 stream (OpenAI's `data: {"error": {...}}`)."""
    msg = err.get("message") if type(err) is dict else err
    what = "the upstream sent an error event"
    if type(msg) is str and msg:
        what += ": " + dep.scrub(msg)[:1000]
    return bad_event(dep, what, started)


def _whole_events(dep: Deployment, doc: Any) -> list[Any]:
    """A chat.completion as provider events: one Delta (choice 0's text, tool
    calls, refusal, logprobs; the message's other fields, the answer's
    top-level fields and choices 1..n-1 as they came), its Usage, its Finish;
    a text-only answer as one Chunk (the pipeline's cheap path, same figures)."""
    plain = _plain_answer(doc)
    if plain is not None:
        return [plain]
    if type(doc) is not dict:
        raise bad_event(dep, "the upstream's answer is not a JSON object", False)
    if "error" in doc and not doc.get("choices"):
        raise _stream_error(dep, doc["error"], False)
    choices = doc.get("choices")
    c0 = choices[0] if type(choices) is list and choices else None
    msg = c0.get("message") if type(c0) is dict else None
    if type(msg) is not dict:
        raise bad_event(dep, "the upstream's answer has no choices[0].message", False)
    assert type(choices) is list and type(c0) is dict
    u = doc.get("usage")
    prompt = u.get("prompt_tokens") if type(u) is dict else None
    completion = u.get("completion_tokens") if type(u) is dict else None
    counted = type(completion) is int
    content = msg.get("content")
    calls = None
    raw_calls = msg.get("tool_calls")
    if type(raw_calls) is list and raw_calls:
        try:
            calls = [ToolCallDelta.from_dict({**tc, "index": i} if type(tc) is dict else tc)
                     for i, tc in enumerate(raw_calls)]
        except ValueError:
            raise bad_event(dep, "the upstream's answer has a malformed tool call",
                            False) from None
    refusal = msg.get("refusal")
    logprobs = c0.get("logprobs")
    # the message's other fields as they came (content too when it is not text)
    own = _MESSAGE_OWN if calls is None else _MESSAGE_OWN_CALLS
    fields = {k: v for k, v in msg.items() if k not in own
              or (k == "content" and v is not None and type(v) is not str)} or None
    others = [c for c in choices[1:] if type(c) is dict] or None
    out: list[Any] = [Delta(content if type(content) is str else None, calls,
                            refusal if type(refusal) is str else None,
                            logprobs if type(logprobs) is dict else None, fields,
                            _top_fields(doc), 0 if counted else None, others)]
    if others is not None and not counted:  # no usage: the other choices' text counted here
        out.append(Delta(tokens=sum(_text_tokens(c.get("message")) for c in others)))
    if type(prompt) is int or counted:
        out.append(Usage(prompt if type(prompt) is int else None,
                         completion if counted else None))
    reason = c0.get("finish_reason")
    if type(reason) is str:
        out.append(Finish(reason))
    return out


# The fields of an answer the server makes itself: the top-level ones (its
# id, object, created, public model name, choices and usage), and a message's
# role, text and refusal (with its tool calls when they are read: the pipeline
# puts them together). Every other field is kept as the upstream sent it.
_TOP_OWN = CHUNK_OWN
_MESSAGE_OWN = frozenset({"role", "content", "refusal"})
_MESSAGE_OWN_CALLS = _MESSAGE_OWN | {"tool_calls"}


def _top_fields(doc: dict[str, Any]) -> dict[str, Any] | None:
    """An answer's top-level fields the server keeps as they came
    (system_fingerprint, service_tier, ...)."""
    if doc.keys() <= _TOP_OWN:
        return None
    return {k: v for k, v in doc.items() if k not in _TOP_OWN}


def _text_tokens(msg: Any) -> int:
    """The cl100k tokens of a message's text (an answer without usage)."""
    content = msg.get("content") if type(msg) is dict else None
    return tokenizer.count(content) if type(content) is str and content else 0


def _plain_answer(doc: Any) -> Chunk | None:
    """A text-only chat.completion (one choice, content a string, no tool calls,
    refusal or logprobs) as one chunk: its text, usage and finish reason; a
    Completion when it has other message or top-level fields to keep."""
    if type(doc) is not dict or "error" in doc:
        return None
    choices = doc.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return None
    c0 = choices[0]
    msg = c0.get("message") if type(c0) is dict else None
    if type(msg) is not dict or c0.get("logprobs") or msg.get("refusal") is not None \
            or msg.get("tool_calls"):
        return None
    content = msg.get("content")
    if type(content) is not str:
        return None
    u = doc.get("usage")
    counted = type(u) is dict and type(u.get("completion_tokens")) is int
    data = {"choices": [{"delta": {"content": content}, "finish_reason": c0.get("finish_reason")}],
            "usage": u if type(u) is dict else None}
    if msg.keys() <= _MESSAGE_OWN and doc.keys() <= _TOP_OWN:  # nothing else to keep
        return Chunk(data, 0 if counted else None)
    return Completion(data, 0 if counted else None,
                      {k: v for k, v in msg.items() if k not in _MESSAGE_OWN} or None,
                      _top_fields(doc))
