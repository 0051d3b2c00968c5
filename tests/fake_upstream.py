"""A fake OpenAI-compatible upstream for tests: a real HTTP/1.1 server in its
own process on 127.0.0.1 (stdlib asyncio only, not neurohttp), that answers as
a *behaviour* says and reports what it saw.

Use from a test:

    up = FakeUpstream(tmp_path).start()          # or the `fake_upstream` fixture
    up.url                                       # "http://127.0.0.1:PORT" (https with tls=)
    up.set_behaviour("stream;count=5;delay_ms=20")   # the default for requests
    up.state()                                   # dict, below
    up.wait_for(lambda s: s["disconnects"] >= 1)     # bounded polling of state()
    up.accept_close(2)                           # the next 2 connections: closed at accept
    up.reset()                                   # clear counters and the log
    up.stop()                                    # by pid (the fixture does it)

    FakeUpstream(tmp_path, tls=(cert_file, key_file))   # HTTPS, records SNI and ALPN

Behaviour of a request, first found: the `x-fake` request header; the JSON
body's `model` when it starts with "fake:" (so a gateway deployment's
upstream model name can choose it: model = "fake:status;code=429"); the
default set by set_behaviour (initially "chat"). Syntax: MODE;key=value;...

    chat        a chat completion (or, with "stream": true in the body, a
                stream as `stream`). The text is `content` (default "You said:
                " + the last user message); `usage=0`: no usage object. The
                answer carries a "fake" object
                echoing what was received: method, path, model, authorization,
                headers (lower-case names), body (the parsed JSON); `echo=0`
                leaves it out. With "n": N in the body, N choices: choice i > 0
                says the text + " #i". `rich=1` adds what reasoning models and
                OpenAI send beside the text: message.reasoning_content,
                message.annotations, the choice's logprobs, top-level
                system_fingerprint and service_tier (see RICH).
    stream      SSE chat.completion.chunk events: a role delta, `count` content
                deltas (default 5: "tok0 ", "tok1 ", ...; or the words of
                `content`), `delay_ms` apart (default 0), a finish chunk, a
                usage chunk when the body asks stream_options.include_usage,
                then `data: [DONE]`. `fragment=N` writes every event in N-byte
                pieces (one chunk each, flushed); `pings=1` adds ": ping" lines;
                `burst=1` writes the whole stream as one chunk (one read);
                `error_at=N` sends an error event in place of event N and ends.
                With "n": N, each event is sent for every choice (index i,
                its words ending "#i" for i > 0); the usage covers them all.
                `rich=1`: a reasoning_content delta first (each choice),
                annotations on choice 0's last content delta, system_fingerprint and service_tier on
                every chunk.
    tools       a tool call (get_weather) as message.tool_calls, or streamed as
                tool-call deltas (arguments in 3 pieces) when the body streams.
    status      an OpenAI error: `code` (default 500), `retry_after` seconds.
    close_mid_stream   `after` events (default 2) then the connection closes
                without the last chunk.
    hang        reads the request and never answers (until the client goes).
    close       reads the request and closes the connection: no response byte.
    close_after answers like chat (`ms` later), keep-alive, then closes the
                connection at once.
    close_next  answers like chat, then closes the connection when the next
                request arrives on it, before answering (a stale keep-alive).
    big         `bytes` (default 10 MiB) of octet-stream, Content-Length,
                written as fast as the client reads; state "written" counts.
    sink        reads the whole body (Content-Length or chunked) keeping none,
                `rate` bytes/s (0: as fast as it comes), answers {"received": n,
                "sha256": ...}; state "received" counts as it goes. Chosen
                by the x-fake header or the default only (the body is not
                parsed for a model).
    early       answers `code` (default 413) at once, reads nothing of the
                body, and closes 2 s later (x-fake header only).
    garbage     answers bytes that are not HTTP.
    delay       like chat after `ms` milliseconds.

state(): connections_total, connections_open, requests, disconnects (a client
closed its connection while the fake waited to answer it (hang, delay) or
was writing a stream or a big body), streams_cut,
streams_done, written, received, sni, alpn, and log (the last 200 requests:
method, path, headers, body, body_bytes, conn, spec).

The control side is a second port (plain HTTP, JSON): GET /state,
POST /behaviour {"spec"}, POST /accept_close {"count"}, POST /reset. It is a
separate port so that closing or hanging API connections never blocks it.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- the server


class State:
    def __init__(self) -> None:
        self.default = "chat"
        self.accept_close = 0
        self.reset()

    def reset(self) -> None:
        self.connections_total = 0
        self.connections_open = 0
        self.requests = 0
        self.disconnects = 0
        self.streams_cut = 0
        self.streams_done = 0
        self.written = 0
        self.received = 0
        self.sni: str | None = None
        self.alpn: str | None = None
        self.log: list[dict[str, Any]] = []

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("default",)}


STATE = State()


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    mode, *parts = spec.split(";")
    opts = {}
    for p in parts:
        k, _, v = p.partition("=")
        if k:
            opts[k.strip()] = v.strip()
    return mode.strip(), opts


class Request:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        try:
            self.json: Any = json.loads(body) if body else None
        except ValueError:
            self.json = None


class Gone(Exception):
    """The client closed the connection."""


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 cid: int) -> None:
        self.reader = reader
        self.writer = writer
        self.id = cid
        self.close_next = False
        self.eof: asyncio.Future[None] | None = None

    async def read_head(self) -> tuple[str, str, dict[str, str]] | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        return method, path, headers

    async def body_chunks(self, headers: dict[str, str]) -> Any:
        """The request body, piece by piece (Content-Length or chunked)."""
        r = self.reader
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await r.readuntil(b"\r\n")
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while (await r.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    return
                left = size
                while left:
                    data = await r.read(min(left, 65536))
                    if not data:
                        raise Gone
                    left -= len(data)
                    yield data
                await r.readexactly(2)
        else:
            left = int(headers.get("content-length", "0"))
            while left:
                data = await r.read(min(left, 65536))
                if not data:
                    raise Gone
                left -= len(data)
                yield data

    def watch_eof(self) -> asyncio.Future[None]:
        """Resolves when the client closes the connection. Only while a response is
        being written (stop_watch before its last bytes): the client sends
        nothing then, so the bytes read here are nobody's request."""
        async def watch() -> None:
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        self.eof = asyncio.ensure_future(watch())
        return self.eof

    async def stop_watch(self) -> None:
        eof, self.eof = self.eof, None
        if eof is not None:
            eof.cancel()  # and wait: until it ends, the reader is still "being read"
            await asyncio.gather(eof, return_exceptions=True)

    async def pause(self, seconds: float) -> None:
        """Sleep, but raise Gone as soon as the client closes."""
        if self.eof is None:
            await asyncio.sleep(seconds)
            return
        done, _ = await asyncio.wait([self.eof], timeout=seconds)
        if done:
            raise Gone

    async def send(self, data: bytes) -> None:
        if self.eof is not None and self.eof.done():
            raise Gone
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            raise Gone from None
        if self.writer.is_closing():
            raise Gone

    async def respond(self, status: int, body: bytes, ctype: str = "application/json",
                      extra: dict[str, str] | None = None) -> None:
        reason = http.client.responses.get(status, "Unknown")
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        for k, v in (extra or {}).items():
            head += f"{k}: {v}\r\n"
        await self.send(head.encode() + b"\r\n" + body)

    async def start_chunked(self, ctype: str = "text/event-stream") -> None:
        await self.send(f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nCache-Control: no-cache\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n".encode())

    async def chunk(self, data: bytes) -> None:
        await self.send(b"%x\r\n%s\r\n" % (len(data), data))


def last_user(body: Any) -> str:
    if isinstance(body, dict):
        for m in reversed(body.get("messages") or []):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return str(m["content"])
    return ""


def echo(req: Request) -> dict[str, Any]:
    return {"method": req.method, "path": req.path,
            "model": req.json.get("model") if isinstance(req.json, dict) else None,
            "authorization": req.headers.get("authorization"), "headers": req.headers,
            "body": req.json}


def completion_base(req: Request, opts: dict[str, str] | None = None) -> dict[str, Any]:
    model = req.json.get("model", "fake") if isinstance(req.json, dict) else "fake"
    base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
    if opts is not None and opts.get("rich") == "1":
        base.update(RICH["top"])
    return base


def choices_asked(req: Request) -> int:
    n = req.json.get("n") if isinstance(req.json, dict) else None
    return n if isinstance(n, int) and n > 1 else 1


# What rich=1 adds (what reasoning models, OpenAI's search models and
# logprobs add to an answer).
RICH: dict[str, Any] = {
    "top": {"system_fingerprint": "fp_fake_rich", "service_tier": "default"},
    "reasoning_content": "Let me think about it.",
    "annotations": [{"type": "url_citation", "url_citation": {
        "url": "https://example.com/a", "title": "A", "start_index": 0, "end_index": 3}}],
    "logprobs": {"content": [{"token": "You", "logprob": -0.25, "bytes": [89, 111, 117],
                              "top_logprobs": []}], "refusal": None},
}


async def answer_chat(c: Conn, req: Request, opts: dict[str, str], tools: bool = False) -> None:
    text = opts.get("content", "You said: " + last_user(req.json))
    if isinstance(req.json, dict) and req.json.get("stream"):
        await answer_stream(c, req, opts, tools=tools)
        return
    rich = opts.get("rich") == "1"
    choices = []
    words = 0
    for i in range(choices_asked(req)):
        said = text if i == 0 else f"{text} #{i}"
        msg: dict[str, Any] = {"role": "assistant", "content": None if tools else said}
        finish = "stop"
        if tools:
            msg["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
            finish = "tool_calls"
        choice: dict[str, Any] = {"index": i, "message": msg, "finish_reason": finish}
        if rich:
            msg["reasoning_content"] = RICH["reasoning_content"]
            msg["annotations"] = RICH["annotations"]
            choice["logprobs"] = RICH["logprobs"]
        choices.append(choice)
        words += len(said.split())
    doc = {**completion_base(req, opts), "object": "chat.completion", "choices": choices,
           "usage": {"prompt_tokens": 5, "completion_tokens": words,
                     "total_tokens": 5 + words}}
    if opts.get("echo") != "0":
        doc["fake"] = echo(req)
    if opts.get("usage") == "0":  # an upstream that reports no usage
        del doc["usage"]
    await c.respond(200, json.dumps(doc).encode())


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


async def answer_stream(c: Conn, req: Request, opts: dict[str, str], tools: bool = False,
                        cut_after: int = -1) -> None:
    base = {**completion_base(req, opts), "object": "chat.completion.chunk"}
    rich = opts.get("rich") == "1"
    n = choices_asked(req)
    count = int(opts.get("count", "5"))
    delay = float(opts.get("delay_ms", "0")) / 1000
    fragment = int(opts.get("fragment", "0"))
    pings = opts.get("pings") == "1"
    if "content" in opts:
        words = [w + " " for w in opts["content"].split()]
    else:
        words = [f"tok{i} " for i in range(count)]
    events: list[bytes] = [sse({**base, "choices": [{"index": i, "delta": {"role": "assistant"},
                                                     "finish_reason": None}]})
                           for i in range(n)]
    if rich:
        events += [sse({**base, "choices": [{"index": i, "delta": {
            "reasoning_content": RICH["reasoning_content"]}, "finish_reason": None}]})
                   for i in range(n)]
    if tools:
        args = ['{"city', '": "Par', 'is"}']
        events.append(sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]}))
        for a in args:
            events.append(sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": a}}]}, "finish_reason": None}]}))
        finish = "tool_calls"
    else:
        for k, w in enumerate(words):
            for i in range(n):
                delta: dict[str, Any] = {"content": w if i == 0 else f"{w.strip()}#{i} "}
                if rich and i == 0 and k == len(words) - 1:
                    delta["annotations"] = RICH["annotations"]
                events.append(sse({**base, "choices": [{"index": i, "delta": delta,
                                                        "finish_reason": None}]}))
        finish = "stop"
    for i in range(n):
        events.append(sse({**base, "choices": [{"index": i, "delta": {},
                                                "finish_reason": finish}]}))
    so = req.json.get("stream_options") if isinstance(req.json, dict) else None
    if isinstance(so, dict) and so.get("include_usage"):
        events.append(sse({**base, "choices": [], "usage": {
            "prompt_tokens": 5, "completion_tokens": n * len(words),
            "total_tokens": 5 + n * len(words)}}))
    events.append(sse(b"[DONE]"))
    c.watch_eof()
    await c.start_chunked()
    if "error_at" in opts:  # an OpenAI error event in place of event N, then the end
        at = int(opts["error_at"])
        events = events[:at] + [sse({"error": {"message": "overloaded", "type": "server_error"}})]
    if opts.get("burst") == "1":  # the whole stream in one write (as nginx sends a file)
        events = [b"".join(events)]
    try:
        for i, ev in enumerate(events):
            if i == cut_after:
                c.writer.transport.abort()
                STATE.streams_cut += 1
                return
            if i and delay:
                await c.pause(delay)
            if pings and i:
                await c.chunk(b": ping\n\n")
            if fragment:
                for k in range(0, len(ev), fragment):
                    await c.chunk(ev[k:k + fragment])
                    await c.pause(0.001)
            else:
                await c.chunk(ev)
        await c.stop_watch()
        await c.send(b"0\r\n\r\n")
        STATE.streams_done += 1
    except Gone:
        STATE.disconnects += 1
        STATE.streams_cut += 1
        raise


async def dispatch(c: Conn, req: Request, mode: str, opts: dict[str, str]) -> bool:
    """Answer `req`; return whether the connection may carry another request."""
    if mode in ("chat", "echo"):
        await answer_chat(c, req, opts)
    elif mode == "stream":
        await answer_stream(c, req, opts)
    elif mode == "tools":
        await answer_chat(c, req, opts, tools=True)
    elif mode == "status":
        code = int(opts.get("code", "500"))
        extra = {"Retry-After": opts["retry_after"]} if "retry_after" in opts else None
        doc = {"error": {"message": f"fake upstream error {code}", "type": "fake_error",
                         "param": None, "code": str(code)}}
        await c.respond(code, json.dumps(doc).encode(), extra=extra)
    elif mode == "close_mid_stream":
        await answer_stream(c, req, opts, cut_after=int(opts.get("after", "2")) + 1)
        return False
    elif mode == "hang":
        await c.watch_eof()
        STATE.disconnects += 1
        return False
    elif mode == "close":
        c.writer.transport.abort()
        return False
    elif mode == "close_after":
        if "ms" in opts:
            await asyncio.sleep(float(opts["ms"]) / 1000)
        await answer_chat(c, req, opts)
        c.writer.close()  # graceful: with TLS, a close_notify right behind the answer
        await c.writer.wait_closed()
        return False
    elif mode == "close_next":
        await answer_chat(c, req, opts)
        c.close_next = True
    elif mode == "big":
        size = int(opts.get("bytes", str(10 << 20)))
        c.watch_eof()
        await c.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        piece = b"x" * 65536
        left = size
        try:
            while left:
                n = min(left, len(piece))
                if n == left:
                    await c.stop_watch()
                await c.send(piece[:n])
                STATE.written += n
                left -= n
        except Gone:
            STATE.disconnects += 1
            raise
    elif mode == "garbage":
        await c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nBad Header\r\n\r\nhello")
        return False
    elif mode == "delay":
        c.watch_eof()
        try:
            await c.pause(float(opts.get("ms", "100")) / 1000)
        except Gone:
            STATE.disconnects += 1
            raise
        await c.stop_watch()
        await answer_chat(c, req, opts)
    else:
        await c.respond(400, json.dumps({"error": {"message": f"unknown fake mode {mode}"}}).encode())
    return True


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    STATE.connections_total += 1
    STATE.connections_open += 1
    cid = STATE.connections_total
    sslobj = writer.get_extra_info("ssl_object")
    if sslobj is not None:
        STATE.alpn = sslobj.selected_alpn_protocol()
    c = Conn(reader, writer, cid)
    try:
        if STATE.accept_close > 0:
            STATE.accept_close -= 1
            writer.transport.abort()
            return
        while True:
            got = await c.read_head()
            if got is None:
                return
            method, path, headers = got
            STATE.requests += 1
            if c.close_next:
                writer.transport.abort()
                return
            spec = headers.get("x-fake")
            if spec is None and STATE.default.startswith("sink"):
                spec = STATE.default  # a sink reads the body as it comes: no model to look at
            mode, opts = parse_spec(spec or "chat")
            if mode == "sink":
                await sink(c, method, path, headers, opts, spec or "sink")
                continue
            if mode == "early":  # answer without reading the body, then close
                code = int(opts.get("code", "413"))
                await c.respond(code, json.dumps({"error": {"message": "too large"}}).encode(),
                                extra={"Connection": "close"})
                # reads nothing more: a client still sending waits on a full socket
                # buffer until it notices the answer; closed after 2 s
                await asyncio.sleep(2)
                return
            body = b"".join([d async for d in c.body_chunks(headers)])
            req = Request(method, path, headers, body)
            if spec is None:
                model = req.json.get("model") if isinstance(req.json, dict) else None
                if isinstance(model, str) and model.startswith("fake:"):
                    spec = model[5:]
                else:
                    spec = STATE.default
            mode, opts = parse_spec(spec)
            STATE.log.append({"method": method, "path": path, "headers": headers,
                              "body": req.json, "body_bytes": len(body), "conn": cid,
                              "spec": spec})
            del STATE.log[:-200]
            if not await dispatch(c, req, mode, opts):
                return
            if headers.get("connection", "").lower() == "close":
                return
    except (Gone, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        STATE.connections_open -= 1
        if c.eof is not None:
            c.eof.cancel()
        writer.transport.abort()


async def sink(c: Conn, method: str, path: str, headers: dict[str, str], opts: dict[str, str],
               spec: str) -> None:
    rate = float(opts.get("rate", "0"))
    h = hashlib.sha256()
    n = 0
    t0 = time.monotonic()
    async for data in c.body_chunks(headers):
        h.update(data)
        n += len(data)
        STATE.received += len(data)
        if rate:
            ahead = n / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
    STATE.log.append({"method": method, "path": path, "headers": headers, "body": None,
                      "body_bytes": n, "conn": c.id, "spec": spec})
    del STATE.log[:-200]
    await c.respond(200, json.dumps({"received": n, "sha256": h.hexdigest()}).encode())


async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            c = Conn(reader, writer, 0)
            got = await c.read_head()
            if got is None:
                return
            method, path, headers = got
            body = b"".join([d async for d in c.body_chunks(headers)])
            arg = json.loads(body) if body else {}
            if path == "/state":
                out: Any = STATE.doc()
            elif path == "/behaviour":
                STATE.default = arg["spec"]
                out = {"ok": True}
            elif path == "/accept_close":
                STATE.accept_close = int(arg["count"])
                out = {"ok": True}
            elif path == "/reset":
                STATE.reset()
                out = {"ok": True}
            else:
                out = {"error": "unknown control path"}
            await c.respond(200, json.dumps(out).encode())
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(cert: str | None, key: str | None) -> None:
    ctx = None
    if cert and key:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])

        def sni(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            STATE.sni = name
        ctx.sni_callback = sni  # type: ignore[assignment]
    api = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx, limit=1 << 20)
    ctl = await asyncio.start_server(control, "127.0.0.1", 0)
    print("ports", api.sockets[0].getsockname()[1], ctl.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------- the test-side handle


class FakeUpstream:
    script = __file__  # the server's program (a test module may extend the fake: proxy_upstream.py)

    def __init__(self, directory: Path, tls: tuple[str, str] | None = None) -> None:
        self.dir = Path(directory)
        self.tls = tls
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.control_port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        args = [sys.executable, self.script]
        if self.tls:
            args += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                                     stderr=open(self.dir / "fake_upstream.log", "w"), text=True)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line += self.proc.stdout.readline() or ""
            if line.endswith("\n"):
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        if not line.startswith("ports "):
            self.stop()
            raise RuntimeError(f"fake upstream did not start: {line!r} "
                               f"{(self.dir / 'fake_upstream.log').read_text()}")
        _, api, ctl = line.split()
        self.port, self.control_port = int(api), int(ctl)
        return self

    def _control(self, method: str, path: str, arg: dict[str, Any] | None = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.control_port, timeout=10)
        try:
            conn.request(method, path, body=json.dumps(arg) if arg is not None else None)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def state(self) -> dict[str, Any]:
        return dict(self._control("GET", "/state"))

    def set_behaviour(self, spec: str) -> None:
        self._control("POST", "/behaviour", {"spec": spec})

    def accept_close(self, count: int) -> None:
        self._control("POST", "/accept_close", {"count": count})

    def reset(self) -> None:
        self._control("POST", "/reset", {})

    def wait_for(self, pred: Callable[[dict[str, Any]], Any], timeout: float = 10.0,
                 what: str = "the fake upstream's state") -> dict[str, Any]:
        """Poll state() until pred(state) is true; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.state()
            if pred(st):
                return st
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}: "
                             f"{ {k: v for k, v in st.items() if k != 'log'} }")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(serve(a.tls_cert, a.tls_key))


if __name__ == "__main__":
    main()
