"""POST /v1/chat, the seed API: {"prompt": "..."} -> {"response", "model", "timestamp", "usage"}.

With "stream": true the answer is chunked NDJSON ({"token": ...} lines, then a
{"done": true, ...} line), or SSE carrying the same objects then [DONE] when
Accept asks for text/event-stream. The answer comes from the shared pipeline.
A model's structured pieces have objects of their own in the stream
({"tool_calls": [...]}, {"refusal": "..."}) and fields of their own in a whole
answer ("tool_calls", "refusal", in OpenAI's message shape).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..ai import tokenizer
from ..ai.cache import HEADER as CACHE_HEADER
from ..ai.pipeline import BATCH, Failure, Generation, Pipeline, parse_stop, usage
from ..ai.providers import Delta
from ..ai.tokenizer import count_now, known
from ..context import UsageEvent
from ..errors import BadInput, error_response
from ..messages import Request, Response, StreamingResponse

if TYPE_CHECKING:
    from ..app import App

_JSON = "application/json"
# the fields of a seed message the server acts on; the others reach the provider
_SEED_FIELDS = frozenset({"prompt", "model", "max_tokens", "stop", "stream"})


def parse_seed(body: Any) -> tuple[str, str | None, dict[str, Any]]:
    """Check a seed-API message ({"prompt", "model"?, "max_tokens"?, "stop"?}):
    (prompt, model, params), or BadInput naming the parameter. Other fields
    are passed to the provider in `params` as they are. Shared by /v1/chat and
    /v1/ws."""
    if type(body) is not dict:
        raise BadInput("request body must be a JSON object", None)
    prompt = body.get("prompt")
    if type(prompt) is not str:
        raise BadInput("'prompt' is required and must be a string", "prompt")
    model = body.get("model")
    if model is not None and type(model) is not str:
        raise BadInput("'model' must be a string", "model")
    params: dict[str, Any] = {k: v for k, v in body.items() if k not in _SEED_FIELDS}
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


def delta_object(d: Delta) -> dict[str, Any] | None:
    """A structured piece as a seed stream object: {"token"?, "tool_calls"?,
    "refusal"?} (None: nothing the seed API shows, e.g. logprobs alone)."""
    obj: dict[str, Any] = {}
    if d.content:
        obj["token"] = d.content
    if d.tool_calls:
        obj["tool_calls"] = [tc.as_dict() for tc in d.tool_calls]
    if d.refusal:
        obj["refusal"] = d.refusal
    return obj or None


class SeedFrames:
    """The seed API's stream as NDJSON lines or SSE events (then [DONE])."""

    batch = BATCH
    streaming = True

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        # every token is this prefix, the token as a JSON string, this suffix
        self.pre, self.post = (b'data: {"token":', b"}\n\n") if sse else (b'{"token":', b"}\n")

    def frame(self, obj: dict[str, Any]) -> bytes:
        if self.sse:
            return b"data: " + orjson.dumps(obj) + b"\n\n"
        return orjson.dumps(obj) + b"\n"

    def start(self, gen: Generation) -> bytes | None:
        return None

    def delta(self, gen: Generation, d: Delta) -> bytes | None:
        obj = delta_object(d)
        return None if obj is None else self.frame(obj)

    def end(self, gen: Generation) -> bytes:
        last = self.frame(done_message(gen))  # counts the tokens before the last bytes leave
        return last + b"data: [DONE]\n\n" if self.sse else last

    def error(self, gen: Generation, failure: Failure) -> bytes:
        return self.frame(failure.body())


NDJSON_FRAMES = SeedFrames(sse=False)
SSE_FRAMES = SeedFrames(sse=True)

# The bytes of a seed answer around its timestamp, by (text, model, tokens):
# short answers repeat, and building and dumping the dict costs ~0.4 µs.
_answers: dict[tuple[str, str, int, int], tuple[bytes, bytes]] = {}
# The same for answers made at once, by their usage event (Pipeline.instant
# makes one per distinct answer; events hash by identity).
_instant: dict[UsageEvent, tuple[bytes, bytes]] = {}


def _parts(text: str, model: str, prompt_tokens: int, completion: int) -> tuple[bytes, bytes]:
    head = orjson.dumps({"response": text, "model": model})[:-1] + b',"timestamp":'
    tail = b',"usage":' + orjson.dumps(usage(prompt_tokens, completion)) + b"}"
    return head, tail


def seed_answer(text: str, model: str, prompt_tokens: int, completion: int,
                second: int) -> bytes:
    """The JSON of a non-streamed /v1/chat answer, stamped with `second`."""
    key = (text, model, prompt_tokens, completion)
    parts = _answers.get(key)
    if parts is None:
        parts = _parts(text, model, prompt_tokens, completion)
        if len(text) <= 256:
            if len(_answers) >= 1024:
                _answers.clear()
            _answers[key] = parts
    return b"%s%d%s" % (parts[0], second, parts[1])


def instant_answer(text: str, ev: UsageEvent, second: int) -> bytes:
    """seed_answer() for an answer made at once, found by its event."""
    parts = _instant.get(ev)
    if parts is None:
        parts = _parts(text, ev.model, ev.prompt_tokens, ev.completion_tokens)
        if len(text) <= 256:
            if len(_instant) >= 1024:
                _instant.clear()
            _instant[ev] = parts
    return b"%s%d%s" % (parts[0], second, parts[1])


class SeedChat:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        # the worker's clock: the answer's second is the Date header's
        self.clock = pipeline.clock

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
        if model is None:
            name, provider = pipeline.default_model
        else:
            found = pipeline.find_model(req, model)
            if found.__class__ is Response:
                return found
            name, provider = found  # type: ignore[misc]  # a Response was returned above
        messages = [{"role": "user", "content": prompt}]
        prompt_tokens = known(prompt)
        if prompt_tokens is None:
            prompt_tokens = count_now(prompt)
        if prompt_tokens < 0:  # a long prompt: counted in slices, off the fast path
            return self._long(req, name, provider, messages, params, stream)
        if not stream:
            done = pipeline.instant(req, name, provider, messages, params, prompt_tokens)
            if done is not None:  # the fast path: no Generation, no task
                return Response(instant_answer(done[0], done[1], self.clock.second), 200,
                                None, _JSON)
        gen = pipeline.begin(req, name, provider, messages, params, prompt_tokens,
                             stream=stream)
        if stream:
            return self._stream(req, gen)
        if gen.run_now():  # stop sequences or filters on a model that answers at once
            return self._answer(req, gen)
        return self._collect(req, gen)

    async def _long(self, req: Request, name: str, provider: Any,
                    messages: list[dict[str, Any]], params: dict[str, Any],
                    stream: bool) -> Response | StreamingResponse:
        """A long prompt: its tokens counted in slices that let the loop run, then
        the answer through the generation path (which also shares the loop)."""
        prompt_tokens = await tokenizer.count_async(messages[0]["content"])
        gen = self.pipeline.begin(req, name, provider, messages, params, prompt_tokens,
                                  stream=stream)
        if stream:
            resp = self._stream(req, gen)
            return resp if isinstance(resp, StreamingResponse) else await resp
        return await self._collect(req, gen)

    def _answer(self, req: Request, gen: Generation) -> Response:
        if gen.failure is not None:
            return gen.failure.response(req)
        u = gen.finish()
        extras = gen.message_extras()
        # a model that caches: hit or miss
        headers = None if gen.cache is None else {CACHE_HEADER: gen.cache.status}
        if extras:
            return Response.json({"response": gen.text, "model": gen.model,
                                  "timestamp": self.clock.second, "usage": u, **extras},
                                 headers=headers)
        return Response(seed_answer(gen.text, gen.model, u["prompt_tokens"],
                                    u["completion_tokens"], self.clock.second), 200, headers,
                        _JSON)

    async def _collect(self, req: Request, gen: Generation) -> Response:
        await gen.run_to_end()
        return self._answer(req, gen)

    def _stream(self, req: Request, gen: Generation) -> Any:
        if "text/event-stream" in (req.headers.get("accept") or ""):
            return self.pipeline.respond(req, gen, SSE_FRAMES, "text/event-stream", True)
        return self.pipeline.respond(req, gen, NDJSON_FRAMES, "application/x-ndjson", False)
