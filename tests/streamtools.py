"""Raw-socket clients for streaming tests: an HTTP/1.1 chunked SSE/NDJSON reader
that sees every byte the server sends (comments, framing, the last chunk), and
a minimal WebSocket frame writer/reader for frames no library would send."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any


class StreamEnded(Exception):
    """The server closed the connection before the last chunk."""


class RawStream:
    """POST a JSON body and read the chunked answer as it arrives."""

    def __init__(self, host: str, port: int, path: str, body: dict[str, Any],
                 headers: dict[str, str] | None = None, rcvbuf: int | None = None,
                 timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(data)}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + data)
        self.buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.finished = False  # the terminating 0-size chunk was read

    def _more(self) -> None:
        b = self.sock.recv(65536)
        if not b:
            raise StreamEnded("connection closed by the server")
        self.buf += b

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        return self.status, self.headers

    def chunks(self) -> Iterator[bytes]:
        """The body's chunks, one by one, until the last chunk."""
        if not self.status:
            self.read_head()
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        while True:
            while b"\r\n" not in self.buf:
                self._more()
            line, _, rest = self.buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(rest) < size + 2:
                self._more()
                line, _, rest = self.buf.partition(b"\r\n")
            assert rest[size:size + 2] == b"\r\n", rest[:size + 2]
            self.buf = rest[size + 2:]
            if size == 0:
                self.finished = True
                return
            yield rest[:size]

    def _records(self, sep: bytes) -> Iterator[str]:
        """The body cut at `sep`, record by record as chunks arrive; nothing left over."""
        pending = b""
        for c in self.chunks():
            pending += c
            while sep in pending:
                rec, _, pending = pending.partition(sep)
                yield rec.decode()
        assert not pending, pending

    def events(self) -> Iterator[str]:
        """SSE events (the text between blank lines: 'data: ...' or ': ping')."""
        return self._records(b"\n\n")

    def lines(self) -> Iterator[str]:
        """NDJSON lines."""
        return self._records(b"\n")

    def close(self) -> None:
        self.sock.close()


def data_events(events: list[str]) -> list[Any]:
    """The JSON payloads of 'data:' events ([DONE] kept as the string)."""
    out = []
    for ev in events:
        if ev.startswith("data: "):
            payload = ev[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ------------------------------------------------------------ WebSocket, by hand
def ws_connect(host: str, port: int, extra: bytes = b"", timeout: float = 10.0,
               headers: dict[str, str] | None = None) -> tuple[socket.socket, bytes, bytes]:
    """Open a WebSocket by hand; returns (socket, response head, bytes after it).
    `extra` is sent in the same write as the handshake."""
    s = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    h = {"Host": host, "Upgrade": "websocket", "Connection": "Upgrade",
         "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
    h.update(headers or {})
    req = "GET /v1/ws HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items() if v) + "\r\n"
    s.sendall(req.encode() + extra)
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        if not b:
            break
        buf += b
    head, _, rest = buf.partition(b"\r\n\r\n")
    return s, head, rest


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
          rsv: int = 0) -> bytes:
    """One client frame (masked unless told otherwise)."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, (0x80 if mask else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def read_frames(s: socket.socket, buf: bytes = b"", until_close: bool = True,
                timeout: float = 10.0) -> tuple[list[tuple[int, bytes]], bool]:
    """Server frames (opcode, payload) until a Close frame (or EOF); and whether
    the server then closed the TCP connection."""
    s.settimeout(timeout)
    frames: list[tuple[int, bytes]] = []
    while True:
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            off = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = struct.unpack("!H", buf[2:4])[0]
                off = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = struct.unpack("!Q", buf[2:10])[0]
                off = 10
            if len(buf) < off + n:
                break
            frames.append((b0 & 0x0F, buf[off:off + n]))
            buf = buf[off + n:]
            if until_close and frames[-1][0] == 0x8:
                try:
                    eof = s.recv(1) == b""
                except (ConnectionResetError, TimeoutError):
                    eof = True
                return frames, eof
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            return frames, True
        if not b:
            return frames, True
        buf += b


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
