"""The OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models.

The request and response shapes are OpenAI's, so the official SDKs work
unchanged: errors map to the SDK's exception classes by status (400
BadRequestError, 404 NotFoundError, ...), and a stream is SSE `data: {chunk}`
events with one id, `delta.role` first, `finish_reason` last, an optional
usage chunk with `choices: []`, then `data: [DONE]`.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..ai import tokenizer
from ..ai.pipeline import (
    SHUTDOWN_ERROR,
    Generation,
    Pipeline,
    parse_stop,
    settle_finish,
)
from ..errors import BadInput, error_response
from ..messages import Request, Response, StreamingResponse
from ..stats import layout as L

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


def parse_request(body: Any) -> tuple[str, list[dict[str, Any]], dict[str, Any], bool, bool]:
    """(model, messages, params, stream, include_usage) of a chat completion
    request; raises BadInput naming the parameter."""
    if type(body) is not dict:
        raise BadInput("request body must be a JSON object", None)
    model = body.get("model")
    if type(model) is not str or not model:
        raise BadInput("'model' is required and must be a string", "model")
    messages = _check_messages(body.get("messages"))
    params: dict[str, Any] = {}
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        v = body.get(key)
        if v is not None:
            if type(v) is not int or v < 1:
                raise BadInput(f"'{key}' must be a positive integer", key)
            params.setdefault("max_tokens", v)
    n = body.get("n")
    if n is not None and (type(n) is not int or n < 1):
        raise BadInput("'n' must be a positive integer", "n")
    if n is not None and n > 1:
        raise BadInput("only n=1 is supported", "n")
    for key, lo, hi in _RANGES:
        v = body.get(key)
        if v is not None:
            if type(v) not in _NUM or not lo <= v <= hi:
                raise BadInput(f"'{key}' must be a number from {lo:g} to {hi:g}", key)
            params[key] = v
    seed = body.get("seed")
    if seed is not None:
        if type(seed) is not int:
            raise BadInput("'seed' must be an integer", "seed")
        params["seed"] = seed
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
    return "chatcmpl-" + os.urandom(12).hex()


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
        if "max_tokens" in params:
            too_many = pipeline.max_tokens_error(
                name, params, "max_completion_tokens" if body.get("max_completion_tokens")
                is not None else "max_tokens")
            if too_many is not None:
                return error_response(req, 400, too_many.message, param=too_many.param)
        if len(req.body) > _LONG:  # a long prompt: counted in slices, off the fast path
            return self._long(req, name, provider, messages, params, stream, include_usage)
        prompt_tokens = tokenizer.count_messages(messages)
        if not stream:
            answer = pipeline.instant(provider, messages, params)
            if answer is not None:  # the fast path: no Generation, no task
                pipeline.slot[L.S_TOKENS_IN] += prompt_tokens
                text, finish = answer
                completion = pipeline.count_out(text)
                if pipeline.meter is not None:
                    pipeline.meter.model_instant(name, prompt_tokens, completion)
                if pipeline.log_usage:  # model and tokens for the access log line
                    st = req.state
                    st["model"] = name
                    st["tokens"] = prompt_tokens + completion
                return self._answer(name, text, settle_finish(
                    finish, completion, params.get("max_tokens")),
                    {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion})
        gen = pipeline.begin(req, name, provider, messages, params, prompt_tokens)
        if stream:
            return self._stream(gen, include_usage)
        if gen.run_now():  # stop sequences or filters on a model that answers at once
            return self._collect_done(gen)
        return self._collect(gen)

    async def _long(self, req: Request, name: str, provider: Any,
                    messages: list[dict[str, Any]], params: dict[str, Any], stream: bool,
                    include_usage: bool) -> Response | StreamingResponse:
        """A long prompt: its tokens counted in slices that let the loop run, then
        the answer through the token path (which also shares the loop)."""
        prompt_tokens = await tokenizer.count_messages_async(messages)
        gen = self.pipeline.begin(req, name, provider, messages, params, prompt_tokens)
        if stream:
            return self._stream(gen, include_usage)
        return await self._collect(gen)

    def _answer(self, model: str, text: str, finish: str, usage: dict[str, int]) -> Response:
        return Response(orjson.dumps({
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage, "system_fingerprint": None}), 200, None, "application/json")

    async def _collect(self, gen: Generation) -> Response:
        return await gen.run_to_end() or self._collect_done(gen)

    def _collect_done(self, gen: Generation) -> Response:
        u = gen.finish()
        return self._answer(gen.model, gen.text, gen.finish_reason or "stop", u)

    def _stream(self, gen: Generation, include_usage: bool) -> StreamingResponse:
        head = {"id": completion_id(), "object": "chat.completion.chunk",
                "created": int(time.time()), "model": gen.model, "system_fingerprint": None}

        def event(obj: dict) -> bytes:
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        first = event(head | {"choices": [{"index": 0,
                                           "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]})
        # Every token event is this prefix, the token as a JSON string, this suffix:
        # one orjson call per token instead of a dict and a full dump.
        pre = first[:first.index(b'"choices":')] + b'"choices":[{"index":0,"delta":{"content":'
        post = b'},"logprobs":null,"finish_reason":null}]}\n\n'

        async def body() -> AsyncIterator[bytes]:
            yield first
            async for data in gen.frames_or_error(pre, post, event):
                yield data
            if gen.failed:
                return
            u = gen.finish()  # counts tokens_out before the last bytes leave
            last = event(head | {"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                              "finish_reason": gen.finish_reason}]})
            if include_usage:
                last += event(head | {"choices": [], "usage": u})
            yield last + b"data: [DONE]\n\n"

        return self.pipeline.respond(gen, body(), "text/event-stream", True, SHUTDOWN_ERROR)


def master_started(block: Any) -> int:
    return int(block.words[L.H_STARTED])
