"""The limits and timeouts of a client connection, frozen: what the sans-IO
state machine (protocol/h1conn.py) and the I/O glue around it (worker/) act
on. The composition root (worker/worker.py) builds one from `[server]`; tests
build their own."""

from __future__ import annotations

from dataclasses import dataclass

LINGER_SECONDS = 2.0  # after a closing answer, input is read and dropped this long


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    max_header_bytes: int = 16384       # request line + fields: 431 above it
    max_body_bytes: int = 8 * 1024 * 1024  # 413 above it; also the WebSocket message bound
    header_timeout: float = 10.0        # a head must arrive within this (408)
    body_timeout: float = 30.0          # a body must arrive within this once its head has (408)
    keepalive_timeout: float = 5.0      # an idle keep-alive connection is closed after this
    send_timeout: float = 60.0          # output left unread this long: the connection is dropped
    request_timeout: float = 600.0      # an answer (or a stream's next piece) due within this
    max_pipeline: int = 32              # queued pipelined requests before reading pauses
    write_buffer_bytes: int = 256 * 1024  # unsent bytes before reading and streaming pause
    ws_ping_s: float = 20.0             # WebSocket: ping a client silent this long (0: never)
    ws_idle_timeout: float = 300.0      # WebSocket: close after this long without a message
    linger: float = LINGER_SECONDS
