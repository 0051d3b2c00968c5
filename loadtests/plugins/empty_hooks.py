"""A plugin whose hooks do nothing: what the hooks themselves cost
(loadtests/micro_hotpath.py --plugin empty, micro_stream.py --plugin empty)."""

from __future__ import annotations

from typing import Any


def setup(app: Any, options: dict[str, Any]) -> None:
    @app.before_request
    def before(request: Any) -> None:
        return None

    @app.after_response
    def after(request: Any, response: Any) -> None:
        return None

    @app.on_token
    def token(request: Any, tok: str) -> str:
        return tok
