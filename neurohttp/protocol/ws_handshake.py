"""The WebSocket opening handshake (RFC 6455 4.2.1), sans-IO: a request's
version and headers in, the Sec-WebSocket-Accept value or a refusal out."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from wsproto.utilities import generate_accept_token


class Refusal:
    """Why a handshake is refused: the status, a message and headers to send."""

    __slots__ = ("status", "message", "headers")

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.headers = headers


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",")}


def check(version: str, header: Callable[[str], str | None]) -> str | Refusal:
    """The Sec-WebSocket-Accept value for a valid opening handshake, else the
    refusal to send instead. `header(name)` gives a request header (lowercase
    name) or None."""
    if "websocket" not in _tokens(header("upgrade")) or "upgrade" not in _tokens(
            header("connection")):
        return Refusal(426, "this endpoint speaks WebSocket: send an Upgrade request",
                       {"Upgrade": "websocket", "Connection": "Upgrade"})
    if version != "1.1":
        return Refusal(400, "WebSocket needs HTTP/1.1")
    if (header("sec-websocket-version") or "").strip() != "13":
        return Refusal(426, "unsupported WebSocket version (13 is spoken)",
                       {"Sec-WebSocket-Version": "13"})
    key = (header("sec-websocket-key") or "").strip()
    try:
        ok = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        return Refusal(400, "missing or invalid Sec-WebSocket-Key")
    return generate_accept_token(key.encode("ascii")).decode("ascii")
