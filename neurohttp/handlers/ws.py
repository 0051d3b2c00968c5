"""GET /v1/ws: the seed chat over WebSocket.

The client sends text messages `{"prompt": "...", "model"?, "max_tokens"?,
"stop"?}`; each is answered with `{"token": ...}` messages (and
`{"tool_calls": [...]}` or `{"refusal": ...}` for a model's structured pieces)
and a final `{"done": true, "model", "finish_reason", "usage"}`, the same
objects as the /v1/chat stream, one prompt after the other on the same
connection. A message that is not a valid prompt, or a model that fails, gets
`{"error": {...}}` (OpenAI's shape) and the connection stays open.

The session sees its connection only through `context.WebSocketPeer`
(send_text, drain, open, write_paused): worker/websocket.py implements it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from ..ai import tokenizer
from ..ai.models import UnknownModel
from ..ai.pipeline import SHUTDOWN_ERROR, Failure, Generation, Pipeline
from ..ai.providers import Delta
from ..context import Counters, WebSocketPeer
from ..errors import BadInput, error_body, error_response
from ..messages import Request, Response, WebSocketUpgrade
from ..protocol import ws_handshake
from .chat import delta_object, done_message, parse_seed

if TYPE_CHECKING:
    from ..app import App

_SHUTDOWN_TEXT = orjson.dumps(SHUTDOWN_ERROR).decode()


class WsFrames:
    """The seed stream as WebSocket text messages, one per piece (UTF-8 JSON:
    the session sends each as a text message)."""

    batch = 1
    streaming = True
    pre = b'{"token":'
    post = b"}"

    def start(self, gen: Generation) -> bytes | None:
        return None

    def delta(self, gen: Generation, d: Delta) -> bytes | None:
        obj = delta_object(d)
        return None if obj is None else orjson.dumps(obj)

    def end(self, gen: Generation) -> bytes:
        return orjson.dumps(done_message(gen))

    def error(self, gen: Generation, failure: Failure) -> bytes:
        return orjson.dumps(failure.body())


WS_FRAMES = WsFrames()


class WebSocketChat:
    def __init__(self, pipeline: Pipeline, counters: Counters) -> None:
        self.pipeline = pipeline
        self.counters = counters

    def register(self, app: App) -> None:
        app.add_route("GET", "/v1/ws", self.upgrade)  # type: ignore[arg-type]  # the upgrade is the connection's

    def upgrade(self, req: Request) -> Response | WebSocketUpgrade:
        accept = ws_handshake.check(req.version, req.headers.get)
        if isinstance(accept, ws_handshake.Refusal):
            return error_response(req, accept.status, accept.message, headers=accept.headers)
        return WebSocketUpgrade(accept, lambda: ChatSession(self.pipeline, self.counters, req))


class ChatSession:
    """Answers the prompts of one WebSocket connection, in order."""

    def __init__(self, pipeline: Pipeline, counters: Counters, req: Request) -> None:
        self.pipeline = pipeline
        self.counters = counters
        self.req = req

    def _error(self, ws: WebSocketPeer, status: int, message: str,
               param: str | None = None, code: str | None = None) -> None:
        ws.send_text(orjson.dumps(error_body(status, message, code=code, param=param)).decode())

    async def on_text(self, ws: WebSocketPeer, text: str) -> None:
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
                             params, prompt_tokens, stream=True)
        await self.answer(ws, gen)

    async def answer(self, ws: WebSocketPeer, gen: Generation) -> None:
        """Send the generation's messages, waiting whenever the client reads slowly."""
        counters = self.counters
        counters.stream_started()
        cancelled = True
        frames = gen.frames(WS_FRAMES)
        try:
            async for message in frames:
                ws.send_text(message.decode())
                if ws.write_paused:
                    await ws.drain()
            cancelled = False
        except ConnectionError:
            return  # the client went away while we waited for it to read
        finally:
            counters.stream_ended(cancelled)
            await frames.aclose()  # (if cut short: closes the provider, reports it cancelled)
            gen.close(cancelled)

    def on_cut(self, ws: WebSocketPeer) -> None:
        ws.send_text(_SHUTDOWN_TEXT)
