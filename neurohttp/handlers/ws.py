"""GET /v1/ws: the seed chat over WebSocket.

The client sends text messages `{"prompt": "...", "model"?, "max_tokens"?,
"stop"?}`; each is answered with `{"token": ...}` messages and a final
`{"done": true, "model", "finish_reason", "usage"}`, the same objects as the
/v1/chat stream, one prompt after the other on the same connection. A message
that is not a valid prompt gets `{"error": {...}}` (OpenAI's shape) and the
connection stays open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..ai import tokenizer
from ..ai.models import UnknownModel
from ..ai.pipeline import SHUTDOWN_ERROR, Pipeline, provider_error
from ..errors import BadInput, error_body, error_response
from ..messages import Request, Response, WebSocketUpgrade
from ..protocol import ws_handshake
from ..stats import layout as L
from ..worker.websocket import WebSocketConnection
from .chat import done_message, parse_seed

if TYPE_CHECKING:
    from ..app import App

_SHUTDOWN_TEXT = orjson.dumps(SHUTDOWN_ERROR).decode()


class WebSocketChat:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def register(self, app: App) -> None:
        app.add_route("GET", "/v1/ws", self.upgrade)  # type: ignore[arg-type]  # the upgrade is the connection's

    def upgrade(self, req: Request) -> Response | WebSocketUpgrade:
        accept = ws_handshake.check(req.version, req.headers.get)
        if isinstance(accept, ws_handshake.Refusal):
            return error_response(req, accept.status, accept.message, headers=accept.headers)
        return WebSocketUpgrade(accept, lambda: ChatSession(self.pipeline, req))


class ChatSession:
    """Answers the prompts of one WebSocket connection, in order."""

    def __init__(self, pipeline: Pipeline, req: Request) -> None:
        self.pipeline = pipeline
        self.req = req

    def _error(self, ws: WebSocketConnection, status: int, message: str,
               param: str | None = None, code: str | None = None) -> None:
        ws.send_text(orjson.dumps(error_body(status, message, code=code, param=param)).decode())

    async def on_text(self, ws: WebSocketConnection, text: str) -> None:
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._error(ws, 400, "message is not valid JSON")
            return
        try:
            prompt, model, params = parse_seed(body)
        except BadInput as e:
            self._error(ws, 400, e.message, e.param)
            return
        pipeline = self.pipeline
        try:
            name, provider = pipeline.models.get(model)
        except UnknownModel:
            self._error(ws, 404, f"the model '{model}' does not exist", "model",
                        "model_not_found")
            return
        too_many = pipeline.max_tokens_error(name, params)
        if too_many is not None:
            self._error(ws, 400, too_many.message, too_many.param)
            return
        # a long prompt is counted in slices that let the loop run
        prompt_tokens = await tokenizer.count_async(prompt)
        gen = pipeline.begin(self.req, name, provider, [{"role": "user", "content": prompt}],
                             params, prompt_tokens)
        s = ws.slot
        s[L.S_STREAMS] += 1
        s[L.S_STREAMS_ACTIVE] += 1
        cancelled = True
        dumps = orjson.dumps
        gen.streaming = True  # count as it goes, keep no text
        toks = gen.tokens()
        try:
            try:
                async for tok in toks:
                    ws.send_text('{"token":' + dumps(tok).decode() + "}")
                    if ws.write_paused:
                        await ws.drain()
            except Exception as e:
                if not isinstance(e, ConnectionError):
                    gen.failed = True
                    self._error_body(ws, provider_error(e)[1])
                    cancelled = False
                return
            ws.send_text(dumps(done_message(gen)).decode())
            cancelled = False
        finally:
            s[L.S_STREAMS_ACTIVE] -= 1
            if cancelled:
                s[L.S_STREAMS_CANCELLED] += 1
            gen.close()
            await toks.aclose()

    def _error_body(self, ws: WebSocketConnection, body: dict[str, Any]) -> None:
        ws.send_text(orjson.dumps(body).decode())

    def on_cut(self, ws: WebSocketConnection) -> None:
        ws.send_text(_SHUTDOWN_TEXT)
