"""Run a real neurohttpd master in a subprocess for tests.

Every server listens on 127.0.0.1 port 0 unless told otherwise (the kernel
picks a free port; we read it from the master's log), is stopped by its pid,
and is checked for a leftover shared-memory block when it stops.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neurohttp.stats import layout as L  # noqa: E402
from neurohttp.stats.block import block_name  # noqa: E402

_LISTEN_RE = re.compile(r"listening on (\S+?):(\d+)[, ]")


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll `pred` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # keep polling; report the last error on timeout
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # TOML has no surrogate-pair escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_key(k: str) -> str:
    """A bare key, or a quoted one ("/v1/chat")."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def to_toml(cfg: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configs: tables of scalars and lists, nested tables."""
    lines, subs, arrays = [], [], []
    for k, v in cfg.items():
        k = toml_key(k)
        if isinstance(v, dict):
            subs.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))  # an array of tables: [[prefix.k]]
        else:
            lines.append(f"{k} = {toml_value(v)}")
    out = ""
    if lines or (prefix and arrays and not subs):
        out += (f"[{prefix}]\n" if prefix else "") + "\n".join(lines) + "\n\n"
    for k, v in subs:
        out += to_toml(v, f"{prefix}.{k}" if prefix else k)
    for k, tables in arrays:
        name = f"{prefix}.{k}" if prefix else k
        for t in tables:
            out += f"[[{name}]]\n" + "".join(f"{a} = {toml_value(b)}\n" for a, b in t.items()) + "\n"
    return out


class Server:
    """A neurohttpd master started from this checkout (python -m neurohttp)."""

    def __init__(self, tmp: Path, workers: int = 2, config: dict[str, Any] | None = None,
                 bind: str | None = "127.0.0.1:0", extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, cli_workers: bool = True) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.config = config or {}
        self.bind = bind
        self.extra_args = extra_args or []
        self.env = env or {}
        # False: the worker count comes from the config file only, so a reload can change it
        # (a -w on the command line wins over the file, at start and on reload).
        self.cli_workers = cli_workers
        self.pid_file = str(self.tmp / "neurohttpd.pid")
        self.config_path = self.tmp / "neurohttp.toml"
        self.log_path = self.tmp / "server.log"
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # ------------------------------------------------------------ lifecycle
    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(to_toml(self.config))

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "neurohttp", "start", "-c", str(self.config_path),
               "--pid-file", self.pid_file]
        if self.cli_workers:
            cmd += ["-w", str(self.workers)]
        if self.bind:
            cmd += ["-b", self.bind]
        return cmd + self.extra_args

    def start(self, wait: bool = True, timeout: float = 20.0) -> Server:
        self.write_config()
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.tmp)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if not self.port:
                m = _LISTEN_RE.search(self.log())
                if not m:
                    return False
                self.port = int(m.group(2))
            h = self.get_json("/health")
            if h.get("workers") != self.workers or len(self.worker_pids()) != self.workers:
                return False
            # /health counts forked workers; connections are steered only to workers
            # that are accepting, which the master sees on its next loop turn
            return self.ready_workers() >= self.workers
        try:
            wait_for(ready, timeout, what="server ready")
        except AssertionError:
            self.kill()
            raise
        time.sleep(0.25)  # one master loop (LOOP_WAIT = 0.2 s): the steering includes them

    def ready_workers(self) -> int:
        """Workers whose slot says READY, read from the stats block's file (no
        request, so nothing shows in access logs or counters)."""
        try:
            with open(f"/dev/shm/{block_name(self.pid_file)}", "rb") as f:
                head = memoryview(f.read(L.HEADER_WORDS * 8)).cast("Q")
                if len(head) < L.HEADER_WORDS:
                    return 0
                n, sw = head[L.H_NSLOTS], head[L.H_SLOT_WORDS]
                states = [int.from_bytes(os.pread(f.fileno(), 8, (L.slot_offset(i, sw)
                                                                  + L.S_STATE) * 8), "little")
                          for i in range(1, n)]
        except FileNotFoundError:
            return 0
        return states.count(L.STATE_READY)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        """The master's stdout/stderr, then the error log file if the config names one."""
        out = ""
        paths = [self.log_path]
        error_log = self.config.get("log", {}).get("error_log", "-")
        if error_log not in ("-", ""):
            paths.append(self.tmp / error_log)  # an absolute path stays as it is
        for p in paths:
            try:
                out += Path(p).read_text(errors="replace")
            except FileNotFoundError:
                pass
        return out

    def worker_pids(self) -> list[int]:
        try:
            return sorted(c.pid for c in psutil.Process(self.pid).children()
                          if c.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return []

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the master, wait for it, and check it left no shared memory behind."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"server did not stop within {timeout}s:\n{self.log()}") from None
        code = self.proc.returncode
        self._log.close()
        self.assert_no_shm()
        return code

    def kill(self) -> None:
        """SIGKILL the master and its workers (test clean-up after a failure)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kids = []
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            pass
        self.proc.kill()
        self.proc.wait(10)
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(kids, timeout=10)
        try:
            os.unlink(f"/dev/shm/{block_name(self.pid_file)}")
        except FileNotFoundError:
            pass

    def assert_no_shm(self) -> None:
        path = f"/dev/shm/{block_name(self.pid_file)}"
        assert not os.path.exists(path), f"shared memory block left behind: {path}"

    # ------------------------------------------------------------ requests
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10.0
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, _, body = self.request("GET", path, timeout=5)
        assert status == 200, (status, body)
        return json.loads(body)

    def stats(self) -> dict[str, Any]:
        return self.get_json("/stats")

    def raw(self, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
        """Send raw bytes on a fresh connection; return everything read until the
        server closes (or `timeout` passes without data)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(data)
            return read_all(s, timeout) if read_until_close else s.recv(65536)


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until EOF, or until `timeout` passes with nothing new."""
    s.settimeout(timeout)
    chunks = []
    while True:
        try:
            b = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split raw bytes into (status, headers, body) for Content-Length or chunked responses."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError(f"incomplete response head: {data[:200]!r}")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode()] = v.strip().decode()
        if status < 200:
            out.append((status, headers, b""))
            data = rest
            continue
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    _, _, rest = rest.partition(b"\r\n")
                    break
                body += rest[:size]
                rest = rest[size + 2:]
        else:
            n = int(headers.get("content-length", "0"))
            body, rest = rest[:n], rest[n:]
        out.append((status, headers, body))
        data = rest
    return out
