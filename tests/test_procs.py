"""The per-process figures in /stats (CPU, RSS, open files), which the
dashboard's per-worker CPU bars are drawn from."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys

import psutil
from server import Server, wait_for

from neurohttp.stats.procs import process_figures

ADDR = "127.0.0.1"
LIMIT = 128  # the worker's file descriptors (soft = hard: nothing to raise)


class LimitedServer(Server):
    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--", *super().command()]


def get_stats(conn: http.client.HTTPConnection) -> dict:
    conn.request("GET", "/stats")
    r = conn.getresponse()
    assert r.status == 200
    return json.loads(r.read())


def test_stats_keep_process_figures_when_a_worker_is_out_of_descriptors(tmp_path):
    """Under a connection flood a worker sits at its descriptor limit. Its
    /stats had no process figures then (psutil could open no /proc file), and
    the dashboard drew every worker at 0% CPU while `neurohttpd status` showed
    them busy. The figures must still be there."""
    srv = LimitedServer(tmp_path / "srv", workers=1)
    srv.start()
    flood: list[socket.socket] = []
    try:
        [worker] = srv.worker_pids()
        conn = http.client.HTTPConnection(ADDR, srv.port, timeout=10)  # the dashboard's
        first = get_stats(conn)["workers"][0]["process"]
        assert first["rss_bytes"] > 0 and first["open_fds"] > 3
        for _ in range(2 * LIMIT):
            flood.append(socket.create_connection((ADDR, srv.port), timeout=10))
        last = [-1]

        def settled() -> bool:  # the worker took what it could
            n = psutil.Process(worker).num_fds()
            same, last[0] = n == last[0], n
            return same
        wait_for(settled, 20, interval=0.5, what="the worker's descriptors to settle")
        doc = get_stats(conn)
        for row in [doc["master"], *doc["workers"]]:
            p = row["process"]
            assert p is not None, row
            assert p["rss_bytes"] > 0 and p["cpu_seconds"] >= 0 and p["open_fds"] > 0, row
        assert doc["workers"][0]["process"]["open_fds"] > first["open_fds"]
        conn.close()
    finally:
        for s in flood:
            s.close()
        srv.stop()
        srv.kill()


def test_process_figures_match_the_kernel():
    me = psutil.Process()
    burn = sum(i * i for i in range(300_000))  # some CPU time of our own
    assert burn > 0
    fig = process_figures(os.getpid())
    assert fig is not None
    t = me.cpu_times()
    assert abs(fig["cpu_seconds"] - (t.user + t.system)) < 0.05
    assert abs(fig["rss_bytes"] - me.memory_info().rss) < 8 * 1024 * 1024
    assert abs(fig["open_fds"] - me.num_fds()) <= 2
    assert process_figures(0) is None
    # a pid that exited is gone, not the figures of whoever had it before
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_figures(child.pid) is None
