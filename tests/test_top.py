"""`neurohttpd top` under a real pseudo-terminal: it shows the server's figures
per worker, refreshes, and exits cleanly on Ctrl-C; piped, it finds the server
through the pid file."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import httpx
import pytest
from server import ROOT

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


class Screen:
    """Everything a program wrote to a terminal (or pipe), read with bounded waits."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.raw = b""
        self.eof = False

    def text(self, since: int = 0) -> str:
        return ANSI.sub(b"", self.raw[since:]).decode(errors="replace")

    def read_until(self, pred, timeout: float, since: int = 0) -> str:
        """Read until pred(text since offset `since`) holds; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not pred(self.text(since)):
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"timed out; screen so far:\n{self.text(since)[-3000:]}")
            self._read(0.2)
        return self.text(since)

    def drain(self, timeout: float) -> None:
        """Read until the writer closes its end (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(0.2)

    def _read(self, wait: float) -> None:
        r, _, _ = select.select([self.fd], [], [], wait)
        if r:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                chunk = b""
            if chunk:
                self.raw += chunk
            else:
                self.eof = True


def wait_exit(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("top did not exit")


# A background job of a non-interactive shell (`pytest ... &`) starts with SIGINT
# ignored, and Python then leaves it ignored: top must quit on Ctrl-C either way.
SIGINT_AS_INHERITED = pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN],
                                              ids=["sigint-default", "sigint-ignored"])


@SIGINT_AS_INHERITED
def test_top_in_a_terminal_shows_workers_and_quits_on_ctrl_c(make_server, inherited):
    srv = make_server(workers=2)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for _ in range(25):
            c.get("/health")
        c.post("/v1/chat", json={"prompt": "Hello"})
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        os.chdir(str(ROOT))
        os.environ.update({"PYTHONPATH": str(ROOT), "TERM": "xterm-256color"})
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)
        signal.signal(signal.SIGINT, inherited)  # kept across exec
        os.execv(sys.executable, [sys.executable, "-m", "neurohttp", "top", "-u", srv.url])
    try:
        pids = [str(p) for p in srv.worker_pids()]

        def shows_figures(screen: str) -> bool:
            return (all(p in screen for p in pids) and str(srv.pid) in screen
                    and "/health" in screen and "req/s" in screen and "echo" in screen)
        scr = Screen(fd)
        screen = scr.read_until(shows_figures, 60)
        assert srv.url in screen
        assert "p50/p90/p99" in screen and "tokens/s" in screen
        # the /health row counts what we sent (plus the harness's readiness checks)
        row = next(line for line in screen.splitlines() if line.strip().startswith("/health"))
        assert int(row.split()[-4]) >= 25
        # it refreshes: a later frame again, with the CPU % known (needs two reads)
        mark = len(scr.raw)
        scr.read_until(lambda s: "/health" in s and "Ctrl-C to quit" in s, 30, since=mark)
        # Ctrl-C through the terminal, as a person would type it
        mark = len(scr.raw)
        os.write(fd, b"\x03")
        scr.drain(20)
        code = wait_exit(pid, 20)
        assert code == 0
        tail = scr.raw[mark:]
        assert b"\x1b[?1049l" in tail  # it left the alternate screen: the terminal is restored
        assert b"Traceback" not in tail
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@SIGINT_AS_INHERITED
def test_top_finds_the_server_through_its_pid_file(make_server, inherited):
    srv = make_server(workers=1)
    proc = subprocess.Popen([sys.executable, "-m", "neurohttp", "top", "--pid-file", srv.pid_file],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    try:
        out = Screen(proc.stdout.fileno()).read_until(
            lambda s: f"127.0.0.1:{srv.port}" in s and "Ctrl-C to quit" in s, 60)
        assert str(srv.worker_pids()[0]) in out
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_top_shows_figures_per_api_key(make_server):
    """[auth] on: a table of the keys (requests, tokens, 403s, 429s) and the
    401s by reason, from a real server's /stats after real refusals."""
    import hashlib

    from rich.console import Console

    from neurohttp.top import CpuMeter, render

    def sha(k: str) -> str:
        return hashlib.sha256(k.encode()).hexdigest()
    srv = make_server(workers=1, config={
        "auth": {"enabled": True, "keys": [
            {"name": "team-a", "sha256": sha("nh-a-key-0123456789"), "rpm": 2},
            {"name": "team-b", "sha256": sha("nh-b-key-0123456789"), "models": ["echo"]}]},
        "models": {"echo": {"provider": "echo"}, "big": {"provider": "echo"}}})
    a = {"Authorization": "Bearer nh-a-key-0123456789"}
    b = {"x-api-key": "nh-b-key-0123456789"}
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert [c.post("/v1/chat", json={"prompt": "Hello"}, headers=a).status_code
                for _ in range(3)] == [200, 200, 429]
        assert c.post("/v1/chat", json={"prompt": "Hi", "model": "big"}, headers=b).status_code == 403
        assert c.post("/v1/chat", json={"prompt": "Hi"}, headers=b).status_code == 200
        assert c.post("/v1/chat", json={"prompt": "Hi"}).status_code == 401
        assert c.post("/v1/chat", json={"prompt": "Hi"},
                      headers={"x-api-key": "nh-wrong-0123456789"}).status_code == 401
        doc = c.get("/stats").json()
    console = Console(record=True, width=160, color_system=None)
    console.print(render(doc, srv.url, CpuMeter()))
    lines = console.export_text().splitlines()
    assert any(line.startswith("API keys") for line in lines)
    row_a = next(line for line in lines if line.strip().startswith("team-a")).split()
    row_b = next(line for line in lines if line.strip().startswith("team-b")).split()
    # key, requests, tokens in, tokens out, 403, 429
    ka, kb = doc["auth"]["keys"]["team-a"], doc["auth"]["keys"]["team-b"]
    assert row_a == ["team-a", "2", str(ka["tokens_in"]), str(ka["tokens_out"]), "0", "1"]
    assert row_b == ["team-b", "1", str(kb["tokens_in"]), str(kb["tokens_out"]), "1", "0"]
    assert ka["tokens_out"] > 0 and kb["tokens_out"] > 0
    assert any("missing 1" in line and "invalid 1" in line for line in lines)


def breaker_server(make_server, up) -> tuple:
    """A model with two deployments: one on the fake upstream, one whose
    upstream is down (connect refused; its breaker opens at the first failure),
    after requests that opened it. Returns (server, the down origin)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    srv = make_server(workers=2, config={"models": {"m": {"deployments": [
        {"base_url": up.url + "/v1", "model": "fake:chat"},
        {"base_url": down + "/v1", "model": "x", "breaker_failures": 1,
         "breaker_cooldown_s": 600.0}]}}})
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        codes = [c.post("/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}).status_code for _ in range(8)]
    assert 502 in codes and 200 in codes
    router = srv.stats()["router"]["m"]["deployments"]
    assert [d["breaker"] for d in router] == ["closed", "open"]
    return srv, down


def test_top_once_shows_each_deployments_breaker(make_server, fake_upstream):
    """`top --once` prints one view and exits: each deployment's breaker state,
    in-flight requests, retries and hedges; the router's counts per model."""
    srv, down = breaker_server(make_server, fake_upstream)
    out = subprocess.run([sys.executable, "-m", "neurohttp", "top", "--once", "-u", srv.url],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "220"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(x for x in lines if x.lstrip().startswith("deployment "))
    assert head.split()[:4] == ["deployment", "origin", "breaker", "out"]
    assert "retries" in head and "hedges" in head
    ok = next(x for x in lines if x.lstrip().startswith("m#0")).split()
    bad = next(x for x in lines if x.lstrip().startswith("m#1")).split()
    assert (ok[1], ok[2]) == (fake_upstream.url, "closed")
    assert (bad[1], bad[2]) == (down, "open")
    figs = srv.stats()["router"]["m"]
    at = next(i for i, x in enumerate(lines) if x.startswith("router "))
    row = next(x for x in lines[at:] if x.lstrip().startswith("m ")).split()
    assert row[1:] == [str(figs[k]) for k in ("requests", "failed", "retries", "hedges",
                                              "fallbacks", "retries_refused")]
    # a server that is not there: one error line, status 1
    gone = subprocess.run([sys.executable, "-m", "neurohttp", "top", "--once", "-u",
                           down], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert gone.returncode == 1 and "cannot read" in gone.stdout
