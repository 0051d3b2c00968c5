"""nginx as a real upstream for tests and benchmarks: a generated config on a
free 127.0.0.1 port, started in the foreground and stopped by its pid."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

NGINX = "/usr/sbin/nginx"

CHAT_BODY = ('{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"up",'
             '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello, AI world!"},'
             '"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":5,'
             '"total_tokens":14}}')


def sse_body(events: int) -> str:
    """An OpenAI-style stream of `events` content deltas and [DONE] (nginx escapes: \\n)."""
    out = []
    for i in range(events):
        out.append('data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up",'
                   '"choices":[{"index":0,"delta":{"content":"tok' + str(i) + ' "},'
                   '"finish_reason":null}]}\\n\\n')
    out.append("data: [DONE]\\n\\n")
    return "".join(out)


def chat_stream_body(events: int) -> str:
    """What an OpenAI upstream streams for "stream": true with usage asked for:
    a role delta, `events` content deltas, a finish chunk, a usage chunk and
    [DONE] (nginx escapes: \\n)."""
    head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"up","choices":'
    chunks = [head + '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}']
    chunks += [head + '[{"index":0,"delta":{"content":"tok' + str(i) + ' "},"finish_reason":null}]}'
               for i in range(events)]
    chunks.append(head + '[{"index":0,"delta":{},"finish_reason":"stop"}]}')
    chunks.append(head + '[],"usage":{"prompt_tokens":9,"completion_tokens":' + str(events)
                  + ',"total_tokens":' + str(9 + events) + '}}')
    return "".join(f"data: {c}\\n\\n" for c in chunks) + "data: [DONE]\\n\\n"


def config_head(d: Path, workers: int, connections: int, keepalive_timeout: str = "75s",
                keepalive_requests: int = 1000000, main_extra: str = "") -> str:
    """An nginx.conf up to the server blocks: foreground, files under `d`, no
    access log (the caller adds its servers and the closing brace of http)."""
    return f"""
worker_processes {workers};
{main_extra}daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_timeout {keepalive_timeout};
  keepalive_requests {keepalive_requests};"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """nginx serving /v1/chat/completions (a fixed chat completion, or `chat_body`
    as `chat_type`: chat_stream_body(n) with "text/event-stream" makes a
    streaming upstream on the same path), /sse (a fixed SSE stream of
    `sse_events` events) and whatever `extra` adds to the server block."""

    def __init__(self, directory: Path, keepalive_timeout: str = "75s",
                 keepalive_requests: int = 1000000, sse_events: int = 20, extra: str = "",
                 worker_processes: int = 1, chat_body: str = CHAT_BODY,
                 chat_type: str = "application/json") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_requests = keepalive_requests
        self.sse_events = sse_events
        self.extra = extra
        self.worker_processes = worker_processes
        self.chat_body = chat_body
        self.chat_type = chat_type
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        return config_head(self.dir, self.worker_processes, 4096, self.keepalive_timeout,
                           self.keepalive_requests) + f"""
  server {{
    listen 127.0.0.1:{self.port} reuseport;
    location = /v1/chat/completions {{
      default_type {self.chat_type};
      return 200 '{self.chat_body}';
    }}
    location = /sse {{
      default_type text/event-stream;
      return 200 '{sse_body(self.sse_events)}';
    }}
    {self.extra}
  }}
}}
"""

    def start(self, timeout: float = 10.0) -> Nginx:
        for _attempt in range(5):  # the free port may be taken before nginx binds it
            self.port = free_port()
            conf = self.dir / "nginx.conf"
            conf.write_text(self._config())
            self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(self.dir),
                                          "-e", str(self.dir / "error.log")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.dir / 'error.log').read_text()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
