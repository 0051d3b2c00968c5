"""Running out of file descriptors (issue 9, item 4), against real servers started
under a low RLIMIT_NOFILE (`ulimit` in a shell that then execs the master): the
master raises the soft limit to the hard one, a worker takes only the connections
the limit allows, and a full worker answers 503 — at its cap and at EMFILE —
without a silent reset, a log line per connection, or a spinning accept loop."""

from __future__ import annotations

import resource
import socket
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from server import Server, wait_for

GET = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
FD_RESERVE = 64  # neurohttp/fdlimit.py


class LimitedServer(Server):
    """A server whose master starts with RLIMIT_NOFILE (soft, hard)."""

    def __init__(self, tmp: Path, soft: int, hard: int, **kw) -> None:
        super().__init__(tmp, **kw)
        self.limits = (soft, hard)

    def command(self) -> list[str]:
        soft, hard = self.limits
        return ["sh", "-c", f'ulimit -Sn {soft} && ulimit -Hn {hard} && exec "$@"', "sh",
                *super().command()]


@pytest.fixture
def limited(tmp_path):
    made: list[Server] = []

    def factory(soft: int, hard: int, **kw) -> LimitedServer:
        srv = LimitedServer(tmp_path / f"srv{len(made)}", soft, hard, **kw)
        made.append(srv)
        return srv.start()

    yield factory
    for srv in made:
        try:
            srv.stop()
        finally:
            srv.kill()


def status_of(s: socket.socket) -> int | str:
    """The status of the one answer on `s` (or what happened instead)."""
    buf = b""
    try:
        while b"\r\n" not in buf:
            b = s.recv(4096)
            if not b:
                return "closed without an answer"
            buf += b
    except OSError as e:
        return type(e).__name__
    return int(buf.split()[1])


def cpu_seconds(pid: int, over: float = 1.0) -> float:
    p = psutil.Process(pid)
    a = p.cpu_times()
    time.sleep(over)
    b = p.cpu_times()
    return (b.user + b.system) - (a.user + a.system)


def test_a_worker_takes_what_the_fd_limit_allows_then_answers_503(limited):
    soft, hard = 128, 256
    srv = limited(soft, hard, workers=1)
    [pid] = srv.worker_pids()
    assert psutil.Process(pid).rlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    cap = hard - FD_RESERVE
    log = srv.log()
    assert f"open-file limit (RLIMIT_NOFILE) raised from {soft} to {hard}" in log
    assert log.count("max_connections = 10000 is more than the open-file limit") == 1
    assert f"each worker takes at most {cap} connections" in log

    held: list[socket.socket] = []
    statuses: Counter = Counter()
    try:
        for _ in range(cap + 80):
            s = socket.create_connection((srv.host, srv.port), timeout=10)
            s.sendall(GET)
            statuses[status_of(s)] += 1
            held.append(s)
        print(dict(statuses))
        # every connection got an answer: served up to the cap, then 503
        assert set(statuses) == {200, 503}, dict(statuses)
        assert cap - 2 <= statuses[200] <= cap and statuses[503] >= 80
        # full, with 80 clients still connected and more knocking: no busy loop
        for _ in range(20):
            with socket.create_connection((srv.host, srv.port), timeout=10) as s:
                s.sendall(GET)
                assert status_of(s) == 503
        assert cpu_seconds(pid) < 0.5
        assert srv.log().count("is full") <= 3  # at most once a second
    finally:
        for s in held:
            s.close()

    def served() -> bool:
        with socket.create_connection((srv.host, srv.port), timeout=10) as s:
            s.sendall(GET)
            return status_of(s) == 200
    wait_for(served, 15, 0.2, "room again once the clients left")
    assert srv.worker_pids() == [pid]


EATER_PLUGIN = '''
import os
from neurohttp.plugins import Response

held = []

def setup(app, options):
    @app.route("GET", "/eat")
    def eat(request):
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        return Response(str(len(held)))

    @app.route("GET", "/release")
    def release(request):
        while held:
            os.close(held.pop())
        return Response("released")
'''


def test_emfile_is_answered_503_logged_once_a_second_and_never_spun_on(limited, tmp_path):
    """Descriptors used up by something else (a plugin here; upstream pools in life):
    accept() fails with EMFILE. New clients still get a 503 (the spare descriptor),
    the log says so at most once a second, and the worker does not spin."""
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "eater.py").write_text(EATER_PLUGIN)
    srv = limited(512, 512, workers=1,
                  config={"plugins": {"paths": [str(pdir)], "enabled": ["eater"]}})
    [pid] = srv.worker_pids()
    control = socket.create_connection((srv.host, srv.port), timeout=10)
    try:
        control.sendall(b"GET /eat HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status_of(control) == 200
        wait_for(lambda: "out of file descriptors (EMFILE" in srv.log(), 10, 0.1,
                 "the worker to notice")
        statuses: Counter = Counter()
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            with socket.create_connection((srv.host, srv.port), timeout=10) as s:
                s.sendall(GET)
                statuses[status_of(s)] += 1
        print(dict(statuses))
        assert set(statuses) == {503}, dict(statuses)
        assert cpu_seconds(pid) < 0.5
        assert srv.log().count("out of file descriptors (EMFILE") <= 5  # ~once a second
        control.sendall(b"GET /release HTTP/1.1\r\nHost: t\r\n\r\n")
        control.settimeout(10)
        assert b"released" in control.recv(65536)
    finally:
        control.close()

    def served() -> bool:
        with socket.create_connection((srv.host, srv.port), timeout=10) as s:
            s.sendall(GET)
            return status_of(s) == 200
    wait_for(served, 15, 0.2, "room again once the descriptors are back")
    assert srv.worker_pids() == [pid]
