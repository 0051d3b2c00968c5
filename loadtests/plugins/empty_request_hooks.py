"""A plugin whose before_request and after_response hooks do nothing: what a
request's hooks cost (loadtests/micro_hotpath.py --plugin hooks). No on_token:
a token filter sends whole answers through the per-piece path (empty_hooks.py)."""

from __future__ import annotations

from typing import Any


def setup(app: Any, options: dict[str, Any]) -> None:
    @app.before_request
    def before(request: Any) -> None:
        return None

    @app.after_response
    def after(request: Any, response: Any) -> None:
        return None
