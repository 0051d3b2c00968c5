"""POST /v1/chat, the seed API: {"prompt": "..."} -> {"response", "model", "timestamp", "usage"}.

With "stream": true the answer is chunked NDJSON ({"token": ...} lines, then a
{"done": true, ...} line), or SSE carrying the same objects then [DONE] when
Accept asks for text/event-stream. The tokens come from the shared pipeline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..ai import tokenizer
from ..ai.pipeline import SHUTDOWN_ERROR, Generation, Pipeline, parse_stop, usage
from ..ai.tokenizer import count, count_now
from ..errors import BadInput, error_response
from ..messages import Request, Response, StreamingResponse
from ..protocol import serialize as ser
from ..stats.layout import S_TOKENS_IN, S_TOKENS_OUT

if TYPE_CHECKING:
    from ..app import App

_JSON = "application/json"


def parse_seed(body: Any) -> tuple[str, str | None, dict[str, Any]]:
    """Check a seed-API message ({"prompt", "model"?, "max_tokens"?, "stop"?}):
    (prompt, model, params), or BadInput naming the parameter. Shared by
    /v1/chat and /v1/ws."""
    if type(body) is not dict:
        raise BadInput("request body must be a JSON object", None)
    prompt = body.get("prompt")
    if type(prompt) is not str:
        raise BadInput("'prompt' is required and must be a string", "prompt")
    model = body.get("model")
    if model is not None and type(model) is not str:
        raise BadInput("'model' must be a string", "model")
    params: dict[str, Any] = {}
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if type(max_tokens) is not int or max_tokens < 1:
            raise BadInput("'max_tokens' must be a positive integer", "max_tokens")
        params["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = parse_stop(stop)
    return prompt, model, params


def done_message(gen: Generation) -> dict[str, Any]:
    """The last object of a seed stream (NDJSON, SSE and WebSocket alike)."""
    u = gen.finish()
    return {"done": True, "model": gen.model, "finish_reason": gen.finish_reason, "usage": u}


# The bytes of a seed answer around its timestamp, by (text, model, tokens):
# short answers repeat, and building and dumping the dict costs ~0.4 µs.
_answers: dict[tuple[str, str, int, int], tuple[bytes, bytes]] = {}


def seed_answer(text: str, model: str, prompt_tokens: int, completion: int) -> bytes:
    """The JSON of a non-streamed /v1/chat answer, stamped with the current second."""
    key = (text, model, prompt_tokens, completion)
    parts = _answers.get(key)
    if parts is None:
        head = orjson.dumps({"response": text, "model": model})[:-1] + b',"timestamp":'
        tail = b',"usage":' + orjson.dumps(usage(prompt_tokens, completion)) + b"}"
        parts = (head, tail)
        if len(text) <= 256:
            if len(_answers) >= 1024:
                _answers.clear()
            _answers[key] = parts
    # the second the worker's clock last ticked: the same second as the Date header
    return b"%s%d%s" % (parts[0], ser.clock.second, parts[1])


class SeedChat:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def register(self, app: App) -> None:
        app.add_route("POST", "/v1/chat", self.chat)

    def chat(self, req: Request) -> Any:
        try:
            body = req.json()  # parsed once: the admission step may have read "model"
        except orjson.JSONDecodeError:
            return error_response(req, 400, "request body is not valid JSON")
        if type(body) is dict and len(body) == 1 and type(body.get("prompt")) is str:
            # the common request, {"prompt": "..."}: nothing else to check
            params: dict[str, Any]
            prompt, model, params, stream = body["prompt"], None, {}, False
        else:
            try:
                prompt, model, params = parse_seed(body)
            except BadInput as e:
                return error_response(req, 400, e.message, param=e.param)
            stream = body.get("stream", False)
            if type(stream) is not bool:
                return error_response(req, 400, "'stream' must be true or false",
                                      param="stream")
            if "max_tokens" in params:  # (an unknown model has no ceiling: 404 below)
                too_many = self.pipeline.max_tokens_error(
                    self.pipeline.default_model[0] if model is None else model, params)
                if too_many is not None:
                    return error_response(req, 400, too_many.message, param=too_many.param)
        pipeline = self.pipeline
        found = pipeline.default_model if model is None else pipeline.find_model(req, model)
        if found.__class__ is Response:
            return found
        name, provider = found  # type: ignore[misc]  # a Response was returned above
        messages = [{"role": "user", "content": prompt}]
        prompt_tokens = count_now(prompt)
        if prompt_tokens < 0:  # a long prompt: counted in slices, off the fast path
            return self._long(req, name, provider, messages, params, stream)
        if not stream and "stop" not in params and not pipeline.filters:
            # the fast path (pipeline.instant, inlined): no Generation, no task
            complete_now = getattr(provider, "complete_now", None)
            answer = None if complete_now is None else complete_now(messages, params)
            if answer is not None:
                text = answer if answer.__class__ is str else answer[0]
                completion = count(text)
                slot = pipeline.slot
                slot[S_TOKENS_IN] += prompt_tokens
                slot[S_TOKENS_OUT] += completion
                pipeline.meter.model_instant(  # type: ignore[union-attr]  # a worker has one
                    name, prompt_tokens, completion)
                if pipeline.log_usage:  # model and tokens for the access log line
                    st = req.state
                    st["model"] = name
                    st["tokens"] = prompt_tokens + completion
                return Response(seed_answer(text, name, prompt_tokens, completion),
                                200, None, _JSON)
        gen = pipeline.begin(req, name, provider, messages, params, prompt_tokens)
        if stream:
            return self._stream(req, gen)
        if gen.run_now():  # stop sequences or filters on a model that answers at once
            return self._answer(gen)
        return self._collect(req, gen)

    async def _long(self, req: Request, name: str, provider: Any,
                    messages: list[dict[str, Any]], params: dict[str, Any],
                    stream: bool) -> Response | StreamingResponse:
        """A long prompt: its tokens counted in slices that let the loop run, then
        the answer through the token path (which also shares the loop)."""
        prompt_tokens = await tokenizer.count_async(messages[0]["content"])
        gen = self.pipeline.begin(req, name, provider, messages, params, prompt_tokens)
        if stream:
            return self._stream(req, gen)
        return await self._collect(req, gen)

    def _answer(self, gen: Generation) -> Response:
        u = gen.finish()
        return Response(seed_answer(gen.text, gen.model, u["prompt_tokens"],
                                    u["completion_tokens"]), 200, None, _JSON)

    async def _collect(self, req: Request, gen: Generation) -> Response:
        return await gen.run_to_end() or self._answer(gen)

    def _stream(self, req: Request, gen: Generation) -> StreamingResponse:
        sse = "text/event-stream" in (req.headers.get("accept") or "")
        if sse:
            def frame(obj: dict) -> bytes:
                return b"data: " + orjson.dumps(obj) + b"\n\n"
            pre, post = b'data: {"token":', b"}\n\n"
        else:
            def frame(obj: dict) -> bytes:
                return orjson.dumps(obj) + b"\n"
            pre, post = b'{"token":', b"}\n"

        async def body() -> AsyncIterator[bytes]:
            async for data in gen.frames_or_error(pre, post, frame):
                yield data
            if gen.failed:
                return
            last = frame(done_message(gen))  # counts tokens_out before the last bytes leave
            yield last + b"data: [DONE]\n\n" if sse else last

        if sse:
            return self.pipeline.respond(gen, body(), "text/event-stream", True, SHUTDOWN_ERROR)
        return self.pipeline.respond(gen, body(), "application/x-ndjson", False, SHUTDOWN_ERROR)
