"""Error responses: OpenAI's JSON shape under /v1/, HTML or JSON elsewhere."""

from __future__ import annotations

import html

import orjson

from .messages import Request, Response
from .protocol.serialize import REASONS

# OpenAI error `type` by status (the SDKs map on the status code; the type is for people).
_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          403: "permission_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 414: "invalid_request_error",
          415: "invalid_request_error", 417: "invalid_request_error",
          429: "rate_limit_error", 431: "invalid_request_error",
          500: "server_error", 502: "upstream_error", 503: "service_unavailable",
          504: "upstream_timeout", 505: "invalid_request_error"}


class BadInput(Exception):
    """A request field that fails validation: answered 400 naming `param`."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_body(status: int, message: str, type: str | None = None, code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def _accept_prefers_json(accept: str) -> bool:
    """True when Accept ranks application/json above text/html."""
    best_json = best_html = -1.0
    for i, item in enumerate(accept.split(",")):
        mtype, _, params = item.strip().partition(";")
        mtype = mtype.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        q -= i * 1e-6  # among equal q, the earlier type wins
        if mtype in ("application/json", "application/*"):
            best_json = max(best_json, q)
        if mtype in ("text/html", "text/*"):
            best_html = max(best_html, q)
    return best_json > best_html


def wants_json(request: Request | None) -> bool:
    if request is None:
        return False
    if request.path.startswith("/v1/"):
        return True
    accept = request.headers.get("accept")
    return bool(accept) and _accept_prefers_json(accept)


def error_response(request: Request | None, status: int, message: str, *,
                   type: str | None = None, code: str | None = None,
                   param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """The error page or JSON error for `request` (None: a request too broken to route)."""
    if wants_json(request):
        return Response(orjson.dumps(error_body(status, message, type, code, param)), status,
                        headers, "application/json")
    reason = REASONS.get(status, "Error")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{status} {reason}"
            f"</title></head><body><h1>{status} {reason}</h1><p>{html.escape(message)}</p>"
            f"<hr><p>NeuroHTTP</p></body></html>\n")
    return Response(page.encode(), status, headers, "text/html; charset=utf-8")
