"""Streamed request bodies on a real server (protocol/h1stream.py, the glue in
worker/connection.py): a plugin route with stream_body=True reads the body
as it arrives with request.stream(), with its own limit, back-pressure,
the 100 Continue at its first read, body_timeout between reads, and a
client that leaves cancelling the handler."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from server import parse_responses, read_all, wait_for

PLUGIN = '''
import asyncio
import hashlib

from neurohttp.plugins import Response

STATE = {"cancelled": 0, "done": 0}


def setup(app, options):
    delay = options.get("delay", 0.0)
    hold = options.get("hold", 0.0)

    @app.route("POST", "/up", stream_body=True, max_upload_bytes=options.get("limit", 0))
    async def up(request):
        h = hashlib.sha256()
        n = 0
        try:
            if hold:
                await asyncio.sleep(hold)  # not reading yet: the client must wait
            async for piece in request.stream():
                h.update(piece)
                n += len(piece)
                if delay:
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            STATE["cancelled"] += 1
            raise
        STATE["done"] += 1
        return Response.json({"received": n, "sha256": h.hexdigest(),
                              "streamed": request.streamed, "body": len(request.body)})

    @app.route("POST", "/early", stream_body=True)
    def early(request):
        return Response.json({"error": {"message": "no"}}, status=403)

    @app.route("GET", "/state")
    def state(request):
        return Response.json(STATE)
'''

MAX_BODY = 1 << 20


def start(make_server, tmp_path: Path, server: dict[str, Any] | None = None,
          **opts: Any) -> Any:
    d = tmp_path / "plugins"
    d.mkdir(exist_ok=True)
    (d / "upsink.py").write_text(PLUGIN)
    return make_server(workers=1, config={
        "server": {"max_body_bytes": MAX_BODY, **(server or {})},
        "plugins": {"paths": [str(d)], "enabled": ["upsink"], "upsink": opts}})


def connect(srv: Any) -> socket.socket:
    return socket.create_connection((srv.host, srv.port), timeout=30)


def head(path: str = "/up", length: int | None = None, extra: bytes = b"") -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else \
        b"Content-Length: %d\r\n" % length
    return b"POST %s HTTP/1.1\r\nHost: x\r\n%s%s\r\n" % (path.encode(), framing, extra)


def chunked(data: bytes, size: int = 65536) -> bytes:
    out = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
           for i in range(0, len(data), size)]
    return b"".join(out) + b"0\r\n\r\n"


def vm(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def state(srv: Any) -> dict[str, int]:
    return dict(srv.get_json("/state"))


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_far_over_max_body_bytes_streams_to_its_route(make_server, tmp_path, framing):
    srv = start(make_server, tmp_path)
    data = os.urandom(20 << 20)
    s = connect(srv)
    if framing == "length":
        s.sendall(head(length=len(data), extra=b"Connection: close\r\n") + data)
    else:
        s.sendall(head(extra=b"Connection: close\r\n") + chunked(data))
    [(status, _, body)] = parse_responses(read_all(s, 30))
    s.close()
    assert status == 200
    assert json.loads(body) == {"received": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                "streamed": True, "body": 0}
    # a collected route keeps max_body_bytes
    r = srv.raw(head("/v1/chat", MAX_BODY + 1))
    assert parse_responses(r)[0][0] == 413


def test_the_route_limit_refuses_a_declared_length_at_once_and_a_chunked_body_when_passed(
        make_server, tmp_path):
    srv = start(make_server, tmp_path, limit=3 << 20)
    s = connect(srv)
    s.sendall(head(length=(3 << 20) + 1, extra=b"Expect: 100-continue\r\n"))
    [(status, headers, _)] = parse_responses(read_all(s, 10))  # no 100 before it
    s.close()
    assert status == 413 and headers["connection"] == "close"
    s = connect(srv)
    s.sendall(head())
    s.sendall(chunked(b"x" * (4 << 20))[:-5])  # past the limit, body not ended
    [(status, headers, body)] = parse_responses(read_all(s, 10))
    s.close()
    assert status == 413 and headers["connection"] == "close"
    assert b"3145728" in body
    assert state(srv)["done"] == 0


def test_the_100_continue_comes_when_the_handler_reads(make_server, tmp_path):
    srv = start(make_server, tmp_path)
    s = connect(srv)
    s.sendall(head(length=5, extra=b"Expect: 100-continue\r\n"))
    s.settimeout(10)
    got = s.recv(100)
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.sendall(b"hello")
    rest = got[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    s.settimeout(10)
    while b"}" not in rest:
        rest += s.recv(65536)
    [(status, headers, body)] = parse_responses(rest)
    assert status == 200 and json.loads(body)["received"] == 5
    assert "connection" not in headers  # the body ended first: keep-alive
    s.sendall(b"GET /state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert parse_responses(read_all(s, 10))[0][0] == 200
    s.close()


def test_an_answer_before_the_body_ends_closes_the_connection_and_sends_no_100(
        make_server, tmp_path):
    srv = start(make_server, tmp_path)
    s = connect(srv)
    s.sendall(head("/early", 10 << 20, b"Expect: 100-continue\r\n"))
    [(status, headers, _)] = parse_responses(read_all(s, 10))
    s.close()
    assert status == 403 and headers["connection"] == "close"


def test_a_client_silent_mid_body_gets_408_after_body_timeout(make_server, tmp_path):
    srv = start(make_server, tmp_path, server={"body_timeout": 1.0})
    s = connect(srv)
    s.sendall(head(length=1000) + b"x" * 100)
    t0 = time.monotonic()
    [(status, headers, body)] = parse_responses(read_all(s, 15))
    s.close()
    assert status == 408 and headers["connection"] == "close", body
    assert time.monotonic() - t0 < 10  # (about 1 s: the sweep runs twice a second)
    assert srv.get_json("/state")["done"] == 0  # and the worker serves on


def test_a_handler_behind_holds_the_client_back_and_memory_stays_flat(make_server, tmp_path):
    srv = start(make_server, tmp_path, hold=3.0)
    [pid] = srv.worker_pids()
    srv.get_json("/state")
    before = vm(pid)
    total = 64 << 20
    block = os.urandom(1 << 20)
    s = connect(srv)
    s.sendall(head(length=total))
    s.setblocking(False)
    sent = 0
    t_end = time.monotonic() + 2.0  # the handler does not read for 3 s
    while time.monotonic() < t_end:
        try:
            sent += s.send(block)
        except BlockingIOError:
            time.sleep(0.01)
    # the socket buffers and a few read sizes hold what was accepted, not 64 MiB
    assert sent < 24 << 20, sent
    s.setblocking(True)
    s.settimeout(60)
    left = total - sent
    while left:
        n = s.send(block[:min(left, len(block))])
        left -= n
    buf = b""
    while b"}" not in buf:
        buf += s.recv(65536)
    s.close()
    [(status, _, body)] = parse_responses(buf)
    assert status == 200 and json.loads(body)["received"] == total
    grew = vm(pid)["VmHWM"] - before["VmHWM"]
    assert grew < 8 << 20, f"peak RSS grew {grew >> 10} KiB"


def test_a_client_gone_mid_upload_cancels_the_handler(make_server, tmp_path):
    srv = start(make_server, tmp_path)
    s = connect(srv)
    s.sendall(head(length=10 << 20) + b"x" * (1 << 20))
    time.sleep(0.3)
    s.close()
    wait_for(lambda: state(srv)["cancelled"] == 1, what="the handler cancelled")
    assert state(srv)["done"] == 0
