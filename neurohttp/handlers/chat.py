"""POST /v1/chat, the seed API: {"prompt": "..."} -> {"response", "model", "timestamp", "usage"}.

With "stream": true the answer is chunked NDJSON ({"token": ...} lines, then a
{"done": true, ...} line), or SSE carrying the same objects then [DONE] when
Accept asks for text/event-stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..ai import tokenizer
from ..ai.models import UnknownModel
from ..errors import error_response
from ..messages import Request, Response, StreamingResponse
from ..stats import layout as L

if TYPE_CHECKING:
    from ..worker.worker import Worker

_JSON = "application/json"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class SeedChat:
    def __init__(self, ctx: Worker) -> None:
        self.ctx = ctx
        self.slot = ctx.slot
        self.models = ctx.models
        self.filters = ctx.app.token_filters
        self.log_usage = getattr(ctx, "access_log", None) is not None

    def register(self, app) -> None:
        app.add_route("POST", "/v1/chat", self.chat)

    def chat(self, req: Request) -> Any:
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            return error_response(req, 400, "request body is not valid JSON")
        if type(body) is not dict:
            return error_response(req, 400, "request body must be a JSON object")
        prompt = body.get("prompt")
        if type(prompt) is not str:
            return error_response(req, 400, "'prompt' is required and must be a string",
                                  param="prompt")
        model = body.get("model")
        if model is not None and type(model) is not str:
            return error_response(req, 400, "'model' must be a string", param="model")
        stream = body.get("stream", False)
        if type(stream) is not bool:
            return error_response(req, 400, "'stream' must be true or false", param="stream")
        params: dict[str, Any] = {}
        max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            if type(max_tokens) is not int or max_tokens < 1:
                return error_response(req, 400, "'max_tokens' must be a positive integer",
                                      param="max_tokens")
            params["max_tokens"] = max_tokens
        try:
            name, provider = self.models.get(model)
        except UnknownModel:
            return error_response(req, 404, f"the model '{model}' does not exist",
                                  code="model_not_found", param="model")
        messages = [{"role": "user", "content": prompt}]
        prompt_tokens = tokenizer.count(prompt)
        self.slot[L.S_TOKENS_IN] += prompt_tokens
        if self.log_usage:  # model and tokens for the access log line
            st = req.state
            st["model"] = name
            st["tokens"] = prompt_tokens
        if stream:
            sse = "text/event-stream" in (req.headers.get("accept") or "")
            return self._stream(req, name, provider, messages, params, prompt_tokens, sse)
        if not self.filters:
            text = provider.complete_now(messages, params)
            if text is not None:
                return self._answer(name, text, prompt_tokens, req)
        return self._collect(req, name, provider, messages, params, prompt_tokens)

    def _answer(self, name: str, text: str, prompt_tokens: int, req: Request) -> Response:
        completion = tokenizer.count(text)
        self.slot[L.S_TOKENS_OUT] += completion
        if self.log_usage:
            req.state["tokens"] += completion
        return Response(orjson.dumps({
            "response": text, "model": name, "timestamp": int(time.time()),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}), 200, None, _JSON)

    async def _tokens(self, req: Request, provider: Any, messages: list, params: dict) -> AsyncIterator[str]:
        """The provider's tokens through the plugins' on_token filters."""
        filters = self.filters
        agen = provider.stream(messages, params)
        try:
            async for tok in agen:
                for f in filters:
                    tok = f(req, tok)
                    if tok is None:
                        return
                yield tok
        finally:
            await agen.aclose()

    async def _collect(self, req: Request, name: str, provider: Any, messages: list,
                       params: dict, prompt_tokens: int) -> Response:
        parts = [tok async for tok in self._tokens(req, provider, messages, params)]
        return self._answer(name, "".join(parts), prompt_tokens, req)

    def _stream(self, req: Request, name: str, provider: Any, messages: list, params: dict,
                prompt_tokens: int, sse: bool) -> StreamingResponse:
        slot = self.slot
        log_usage = self.log_usage
        sent: list[str] = []
        counted = [False]

        if sse:
            def frame(obj: dict) -> bytes:
                return b"data: " + orjson.dumps(obj) + b"\n\n"
        else:
            def frame(obj: dict) -> bytes:
                return orjson.dumps(obj) + b"\n"

        async def body() -> AsyncIterator[bytes]:
            async for tok in self._tokens(req, provider, messages, params):
                sent.append(tok)
                yield frame({"token": tok})
            completion = tokenizer.count("".join(sent))
            slot[L.S_TOKENS_OUT] += completion  # before the last bytes leave
            if log_usage:
                req.state["tokens"] += completion
            counted[0] = True
            yield frame({"done": True, "model": name, "usage": usage(prompt_tokens, completion)})
            if sse:
                yield b"data: [DONE]\n\n"

        def on_close(cancelled: bool) -> None:
            if not counted[0]:  # cut short: count what was generated
                slot[L.S_TOKENS_OUT] += tokenizer.count("".join(sent))

        if sse:
            return StreamingResponse(body(), 200, dict(_SSE_HEADERS), "text/event-stream",
                                     on_close)
        return StreamingResponse(body(), 200, {"Cache-Control": "no-cache"},
                                 "application/x-ndjson", on_close)
