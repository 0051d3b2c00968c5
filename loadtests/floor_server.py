"""The floor: the least a pre-fork Python server on uvloop + httptools costs.

A master forks N workers on SO_REUSEPORT sockets; each runs uvloop with an
asyncio Protocol that feeds httptools and answers every request with a fixed
200 JSON body of the same size as neurohttp's answer on that route. No
routing, no handler, no stats, no limits: only the event loop, the parser and
the socket calls. bench.py runs it in the same wrk run as nginx, uvicorn and
neurohttpd (`--variants plain,floor`), so what neurohttp's own code costs
above it, and which targets no Python server on these libraries can meet on
this machine, are measured rather than argued.

    python loadtests/floor_server.py --port 8330 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from email.utils import formatdate

import httptools
import uvloop

# Bodies as long as neurohttp's: /health and the /v1/chat echo answer.
BODIES = {
    b"/health": b'{"status":"ok","version":"0.1.0","uptime":1,"workers":2}',
    b"/v1/chat": (b'{"response":"Hello, AI world!","model":"echo","timestamp":1795843279,'
                  b'"usage":{"prompt_tokens":1,"completion_tokens":5,"total_tokens":6}}'),
}


def responses() -> dict[bytes, bytes]:
    date = formatdate(usegmt=True).encode()
    return {path: (b"HTTP/1.1 200 OK\r\nServer: floor\r\nDate: " + date +
                   b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                   + body) for path, body in BODIES.items()}


class Floor(asyncio.Protocol):
    __slots__ = ("transport", "parser", "url", "answers")

    def __init__(self, answers: dict[bytes, bytes]) -> None:
        self.answers = answers
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        self.transport.write(self.answers.get(self.url) or self.answers[b"/health"])


def worker(sock: socket.socket) -> None:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    answers = responses()
    loop.run_until_complete(loop.create_server(lambda: Floor(answers), sock=sock))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    loop.run_forever()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    children = []
    for _ in range(args.workers):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", args.port))
        s.listen(1024)
        s.setblocking(False)
        pid = os.fork()
        if pid == 0:
            worker(s)
            os._exit(0)
        s.close()
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
