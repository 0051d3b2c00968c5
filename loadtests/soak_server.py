"""A real `python -m neurohttp start` for the soak runs (loadtests/soak.py): started
from the checkout this file lives in (PYTHONPATH), on a free port, in a temporary
directory; its workers found, their RSS sampled; stopped by its pid at the end,
with its exit code and any shared memory left behind."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent

_LOG_LINE = re.compile(r"^\S+ \S+ \[\d+\] \[(WARNING|ERROR|CRITICAL)\] (.*)$")
_NUMBERS = re.compile(r"\d+(\.\d+)?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def git_commit(path: Path = ROOT) -> str:
    """The commit of the checkout under test (and '+dirty' when it has changes)."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")


class SoakServer:
    """`python -m neurohttp start -c <config>` with the config text given, where
    "{port}", "{workers}" and "{error_log}" are filled in."""

    def __init__(self, config: str, workers: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="neurohttp-soak-"))
        self.port = free_port()
        self.workers_wanted = workers
        self.error_log = self.tmp / "error.log"
        self.config_path = self.tmp / "soak.toml"
        self.config_path.write_text(config.format(port=self.port, workers=workers,
                                                  error_log=self.error_log))
        self.pid_file = str(self.tmp / "soak.pid")
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.master: psutil.Process | None = None
        self._procs: dict[int, psutil.Process] = {}

    def start(self, timeout: float = 30.0) -> None:
        """Start the master and wait (bounded) until its workers answer /health."""
        cmd = [sys.executable, "-m", "neurohttp", "start", "-c", str(self.config_path),
               "--pid-file", self.pid_file]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=self.tmp,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.master = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} at start; "
                                   f"see {self.error_log}")
            if (len(self.worker_pids()) >= self.workers_wanted
                    and os.path.exists(self.pid_file) and self.get("/health") is not None):
                return
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                raise RuntimeError(f"server did not start in {timeout:.0f} s; "
                                   f"see {self.error_log}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_pids(self) -> list[int]:
        """The master's worker processes (their title is "neurohttpd: worker N"),
        draining ones of older generations included."""
        if self.master is None:
            return []
        pids = []
        try:
            children = self.master.children()
        except psutil.Error:
            return []
        for c in children:
            try:
                if "worker" in " ".join(c.cmdline()):
                    pids.append(c.pid)
            except psutil.Error:
                pass
        return pids

    def _process(self, pid: int) -> psutil.Process:
        p = self._procs.get(pid)
        if p is None:
            p = self._procs[pid] = psutil.Process(pid)
        return p

    def rss_mb(self, pids: list[int]) -> dict[int, float]:
        """RSS in MiB of each of these processes still alive."""
        out = {}
        for pid in pids:
            try:
                rss = self._process(pid).memory_info().rss
            except psutil.Error:
                self._procs.pop(pid, None)
                continue
            if rss:  # 0: a zombie (exited, not reaped yet)
                out[pid] = rss / 1048576
        return out

    def get(self, path: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """GET `path` on a fresh connection; the JSON answer, or None."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                return None
            doc = json.loads(body)
            return doc if isinstance(doc, dict) else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def stop(self, timeout: float = 60.0) -> tuple[int, bool]:
        """SIGTERM to the master (by pid), wait for it; (exit code, shared memory left).
        A master that does not exit in time is SIGKILLed (exit code -9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = -9
        sys.path.insert(0, str(ROOT))
        from neurohttp.stats.block import block_name
        return code, os.path.exists(f"/dev/shm/{block_name(self.pid_file)}")

    def log_problems(self) -> dict[str, int]:
        """WARNING and ERROR lines of the error log, counted by message (numbers
        replaced by N so that one kind of message is one entry)."""
        counts: Counter[str] = Counter()
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return {}
        for line in text.splitlines():
            m = _LOG_LINE.match(line)
            if m:
                counts[f"{m.group(1)} {_NUMBERS.sub('N', m.group(2))[:120]}"] += 1
        return dict(counts.most_common())
