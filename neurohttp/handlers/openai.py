"""The OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models.

The request and response shapes are OpenAI's, so the official SDKs work
unchanged: errors map to the SDK's exception classes by status (400
BadRequestError, 404 NotFoundError, ...), and a stream is SSE `data: {chunk}`
events with one id, `delta.role` first, `finish_reason` last, an optional
usage chunk with `choices: []`, then `data: [DONE]`.
"""

from __future__ import annotations

import time
from random import getrandbits as _getrandbits
from typing import TYPE_CHECKING, Any

import orjson

from ..ai import tokenizer
from ..ai.cache import HEADER as CACHE_HEADER
from ..ai.pipeline import BATCH, Failure, Generation, Pipeline, parse_stop, usage
from ..ai.providers import Delta
from ..errors import BadInput, error_response
from ..messages import Request, Response, StreamingResponse

if TYPE_CHECKING:
    from ..app import App

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_NUM = (int, float)
# numeric sampling parameters: (name, lowest, highest)
_RANGES = (("temperature", 0, 2), ("top_p", 0, 1),
           ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2))
# a body longer than this has its prompt counted in slices that let the loop run
# (its texts are no longer than the body)
_LONG = tokenizer.SLICE


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if type(messages) is not list or not messages:
        raise BadInput("'messages' must be a non-empty array of messages", "messages")
    for i, m in enumerate(messages):
        if type(m) is not dict:
            raise BadInput(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise BadInput(f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}",
                           f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            if role != "assistant":  # an assistant turn may carry only tool calls
                raise BadInput(f"messages[{i}].content is required", f"messages[{i}].content")
        elif type(content) is list:
            for part in content:
                if type(part) is not dict or type(part.get("type")) is not str:
                    raise BadInput(f"messages[{i}].content parts must be objects with a 'type'",
                                   f"messages[{i}].content")
        elif type(content) is not str:
            raise BadInput(f"messages[{i}].content must be a string or an array of parts",
                           f"messages[{i}].content")
    return messages


# Fields the server acts on (checked here); every other field of the request
# reaches the provider in `params` as it was sent (tools, tool_choice,
# response_format, logprobs, user, ...).
_OWN = frozenset({"model", "messages", "stream", "stream_options", "max_tokens",
                  "max_completion_tokens", "stop"})


def parse_request(body: Any) -> tuple[str, list[dict[str, Any]], dict[str, Any], bool, bool]:
    """(model, messages, params, stream, include_usage) of a chat completion
    request; raises BadInput naming the parameter."""
    if type(body) is not dict:
        raise BadInput("request body must be a JSON object", None)
    model = body.get("model")
    if type(model) is not str or not model:
        raise BadInput("'model' is required and must be a string", "model")
    messages = _check_messages(body.get("messages"))
    if len(body) == 2:  # {"model", "messages"}: nothing else to check or pass on
        return model, messages, {}, False, False
    params: dict[str, Any] = {k: v for k, v in body.items() if k not in _OWN}
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        v = body.get(key)
        if v is not None:
            if type(v) is not int or v < 1:
                raise BadInput(f"'{key}' must be a positive integer", key)
            params.setdefault("max_tokens", v)
    if body.get("max_completion_tokens") is not None:  # an upstream gets it under this name
        params["max_completion_tokens"] = params["max_tokens"]
    n = params.get("n")
    if n is not None and (type(n) is not int or n < 1):
        raise BadInput("'n' must be a positive integer", "n")
    for key, lo, hi in _RANGES:
        v = params.get(key)
        if v is not None and (type(v) not in _NUM or not lo <= v <= hi):
            raise BadInput(f"'{key}' must be a number from {lo:g} to {hi:g}", key)
    seed = params.get("seed")
    if seed is not None and type(seed) is not int:
        raise BadInput("'seed' must be an integer", "seed")
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = parse_stop(stop)
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise BadInput("'stream' must be a boolean", "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise BadInput("'stream_options' is only allowed when 'stream' is true",
                           "stream_options")
        if type(opts) is not dict:
            raise BadInput("'stream_options' must be an object", "stream_options")
        iu = opts.get("include_usage")
        if iu is not None and type(iu) is not bool:
            raise BadInput("'stream_options.include_usage' must be a boolean",
                           "stream_options.include_usage")
        include_usage = bool(iu)
    return model, messages, params, bool(stream), include_usage


def completion_id() -> str:
    # 96 random bits from the random module, not os.urandom: an id is not a
    # secret, and urandom is a getrandom() system call per answer. The module
    # reseeds itself in each forked worker (random.py registers at fork).
    return "chatcmpl-" + _getrandbits(96).to_bytes(12, "little").hex()



def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _upstream_fields(obj: dict[str, Any], fields: dict[str, Any]) -> None:
    """Add an upstream's top-level fields (system_fingerprint, service_tier,
    ...) to a chunk or an answer: the id, object, created, model, choices and
    usage stay the server's."""
    for k, v in fields.items():
        if k not in obj or k == "system_fingerprint":
            obj[k] = v


def n_refused(name: str, provider: Any, filters: bool) -> BadInput | None:
    """The 400 for `n` > 1 where it cannot be honoured: a provider that does
    not give several choices (`supports_n`: the echo model, a plugin's), or
    plugins' token filters (they see one text: the other choices would pass
    unfiltered)."""
    if not getattr(provider, "supports_n", False):
        return BadInput(f"n > 1 is not supported by the model '{name}': it answers one "
                        "choice; send n=1", "n")
    if filters:
        return BadInput("n > 1 is not supported while plugins filter the answer's tokens "
                        "(on_token): send n=1", "n")
    return None


class CompletionFrames:
    """A chat completion as OpenAI streams it: one id, the role first, a chunk
    per piece (a Delta's tool calls, refusal, logprobs and other fields as they
    came; with n > 1 the other choices' chunks as the upstream sent them, their
    role and finish_reason included), the finish_reason, the usage chunk if
    asked for, then [DONE]."""

    batch = BATCH
    streaming = True

    def __init__(self, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.head = {"id": completion_id(), "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model, "system_fingerprint": None}
        self.first = _event(self.head | {"choices": [{
            "index": 0, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None}]})
        # Every text event is this prefix, the text as a JSON string, this suffix:
        # one orjson call per piece instead of a dict and a full dump.
        self.pre = (self.first[:self.first.index(b'"choices":')]
                    + b'"choices":[{"index":0,"delta":{"content":')
        self.post = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def start(self, gen: Generation) -> bytes:
        return self.first

    def delta(self, gen: Generation, d: Delta) -> bytes:
        delta: dict[str, Any] = dict(d.extra) if d.extra else {}
        if d.content is not None:
            delta["content"] = d.content
        if d.refusal is not None:
            delta["refusal"] = d.refusal
        if d.tool_calls:
            delta["tool_calls"] = [tc.as_dict() for tc in d.tool_calls]
        # the upstream's own chunk fields (system_fingerprint, ...) as they came;
        # the id, object, created and model are the server's
        obj = dict(self.head)
        if d.chunk:
            _upstream_fields(obj, d.chunk)
        others = d.choices
        if others is None:
            obj["choices"] = [{"index": 0, "delta": delta, "logprobs": d.logprobs,
                               "finish_reason": None}]
        else:  # n > 1: the other choices' deltas as they came (choice 0 when it has one)
            obj["choices"] = ([{"index": 0, "delta": delta, "logprobs": d.logprobs,
                                "finish_reason": None}] if delta or d.logprobs else []) + others
        return _event(obj)

    def end(self, gen: Generation) -> bytes:
        u = gen.finish()  # counts the tokens before the last bytes leave
        last = _event(self.head | {"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                "finish_reason": gen.finish_reason}]})
        if self.include_usage:
            last += _event(self.head | {"choices": [], "usage": u})
        return last + b"data: [DONE]\n\n"

    def error(self, gen: Generation, failure: Failure) -> bytes:
        return _event(failure.body())


class OpenAIHandlers:
    def __init__(self, pipeline: Pipeline, created: int) -> None:
        self.pipeline = pipeline
        self.created = created

    def register(self, app: App) -> None:
        app.add_route("POST", "/v1/chat/completions", self.completions)
        app.add_route("GET", "/v1/models", self.list_models)
        for name in self.pipeline.models.names():
            app.add_route("GET", f"/v1/models/{name}", self.get_model)

    # ------------------------------------------------------------ /v1/models
    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "neurohttp"}

    def list_models(self, req: Request) -> Response:
        names = self.pipeline.models.names()
        if req.key is not None and req.key.models is not None:  # a key sees its models only
            names = [n for n in names if n in req.key.models]
        return Response.json({"object": "list", "data": [self._model(n) for n in names]})

    def get_model(self, req: Request) -> Response:
        return Response.json(self._model(req.path[len("/v1/models/"):]))

    # ------------------------------------------------------------ /v1/chat/completions
    def completions(self, req: Request) -> Any:
        try:
            body = req.json()  # parsed once: the admission step may have read "model"
        except orjson.JSONDecodeError:
            return error_response(req, 400, "request body is not valid JSON")
        try:
            model, messages, params, stream, include_usage = parse_request(body)
        except BadInput as e:
            return error_response(req, 400, e.message, param=e.param)
        pipeline = self.pipeline
        found = pipeline.find_model(req, model)
        if found.__class__ is Response:
            return found
        name, provider = found  # type: ignore[misc]  # a Response was returned above
        if params and (params.get("n") or 1) > 1:
            refused = n_refused(name, provider, bool(pipeline.filters))
            if refused is not None:
                return error_response(req, 400, refused.message, param=refused.param)
        if "max_tokens" in params:
            too_many = pipeline.max_tokens_error(
                name, params, "max_completion_tokens" if body.get("max_completion_tokens")
                is not None else "max_tokens")
            if too_many is not None:
                return error_response(req, 400, too_many.message, param=too_many.param)
        if len(req.body) > _LONG:  # a long prompt: counted in slices, off the fast path
            return self._long(req, name, provider, messages, params, stream, include_usage)
        if getattr(provider, "reports_usage", False):
            # an upstream counts the prompt itself: counted here only if its
            # answer does not say (Generation._count); nothing comes at once
            prompt_tokens = -1
        else:
            prompt_tokens = tokenizer.count_messages(messages)
            if not stream:
                done = pipeline.instant(req, name, provider, messages, params, prompt_tokens)
                if done is not None:  # the fast path: no Generation, no task
                    text, ev = done
                    return self._answer(name, text, ev.finish_reason or "stop",
                                        usage(prompt_tokens, ev.completion_tokens))
        gen = pipeline.begin(req, name, provider, messages, params, prompt_tokens,
                             stream=stream)
        if stream:
            return pipeline.respond(req, gen, CompletionFrames(name, include_usage),
                                    "text/event-stream", True)
        if gen.run_now():  # stop sequences or filters on a model that answers at once
            return self._collect_done(req, gen)
        return self._collect(req, gen)

    async def _long(self, req: Request, name: str, provider: Any,
                    messages: list[dict[str, Any]], params: dict[str, Any], stream: bool,
                    include_usage: bool) -> Response | StreamingResponse:
        """A long prompt: its tokens counted in slices that let the loop run, then
        the answer through the generation path (which also shares the loop)."""
        prompt_tokens = await tokenizer.count_messages_async(messages)
        gen = self.pipeline.begin(req, name, provider, messages, params, prompt_tokens,
                                  stream=stream)
        if stream:
            resp = self.pipeline.respond(req, gen, CompletionFrames(name, include_usage),
                                         "text/event-stream", True)
            return resp if isinstance(resp, StreamingResponse) else await resp
        return await self._collect(req, gen)

    def _answer(self, model: str, text: str, finish: str, usage: dict[str, int],
                gen: Generation | None = None) -> Response:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        logprobs = headers = more = top = None
        if gen is not None:
            if gen.cache is not None:  # a model that caches: hit or miss
                headers = {CACHE_HEADER: gen.cache.status}
            if gen.fields:  # the upstream's other message fields, as they came
                message.update(gen.fields)
            message.update(gen.message_extras())
            if not text and message["content"] == "" and (
                    message.get("tool_calls") or message.get("function_call")
                    or message.get("audio")):
                message["content"] = None  # OpenAI's shape for an answer that is not text
            logprobs = gen.logprobs
            more = gen.choices  # n > 1: the upstream's other choices, as they came
            top = gen.top
        choices = [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}]
        if more:
            choices += more
        doc = {"id": completion_id(), "object": "chat.completion", "created": int(time.time()),
               "model": model, "choices": choices, "usage": usage, "system_fingerprint": None}
        if top:
            _upstream_fields(doc, top)
        return Response(orjson.dumps(doc), 200, headers, "application/json")

    async def _collect(self, req: Request, gen: Generation) -> Response:
        await gen.run_to_end()
        return self._collect_done(req, gen)

    def _collect_done(self, req: Request, gen: Generation) -> Response:
        if gen.failure is not None:
            return gen.failure.response(req)
        u = gen.finish()
        return self._answer(gen.model, gen.text, gen.finish_reason or "stop", u, gen)
