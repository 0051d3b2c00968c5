"""The neurohttpd command against real masters: check, status, stop, stop --now, --daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from server import ROOT, read_all, to_toml, wait_for

from neurohttp.stats.block import block_name


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "neurohttp", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def test_check_names_unknown_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nbind = ["127.0.0.1:0"]\n\n[log]\nlevl = "info"\n')
    r = cli("check", "-c", str(bad))
    assert r.returncode == 1
    assert "log.levl" in r.stderr and str(bad) in r.stderr
    bad.write_text('[models.echo]\nprovider = "echo"\ndelay = 3\n')
    r = cli("check", "-c", str(bad))
    assert r.returncode == 1 and "models.echo.delay" in r.stderr and str(bad) in r.stderr
    r = cli("check", "-c", str(tmp_path / "missing.toml"))
    assert r.returncode == 1 and "missing.toml" in r.stderr


def test_start_refuses_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nworkerz = 2\n")
    r = cli("start", "-c", str(bad), "--pid-file", str(tmp_path / "p.pid"), timeout=30)
    assert r.returncode != 0 and "server.workerz" in r.stderr and str(bad) in r.stderr


def test_status_and_stop_through_pid_file(make_server):
    srv = make_server(workers=2)
    r = cli("status", "--pid-file", srv.pid_file)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"master pid {srv.pid}" in r.stdout
    for pid in srv.worker_pids():
        assert str(pid) in r.stdout
    # status finds the pid file through the config too
    r = cli("status", "-c", str(srv.config_path), cwd=srv.tmp)
    assert r.returncode == 0 and str(srv.pid) in r.stdout
    r = cli("stop", "--pid-file", srv.pid_file)
    assert r.returncode == 0, r.stderr
    assert srv.proc.wait(10) == 0  # stop waited for the exit; this only reaps it
    assert not os.path.exists(srv.pid_file)
    srv.assert_no_shm()
    r = cli("status", "--pid-file", srv.pid_file)
    assert r.returncode == 3 and "not running" in r.stdout
    r = cli("stop", "--pid-file", srv.pid_file)  # nothing to stop: LSB says success
    assert r.returncode == 0 and "not running" in r.stderr


def test_status_with_stale_pid_file(tmp_path):
    pid_file = tmp_path / "p.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text(f"{dead.pid}\n")
    r = cli("status", "--pid-file", str(pid_file))
    assert r.returncode == 3


def test_stop_now_ends_a_stream_at_once(make_server):
    slow = {"models": {"echo": {"provider": "echo", "token_delay_ms": 500,
                                "response": "a b c d e f g h i j k l m n o p"}},
            "server": {"graceful_timeout": 30}}
    srv = make_server(workers=1, config=slow)
    import socket
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    body = b'{"prompt":"x","stream":true}'
    s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    assert b"token" in s.recv(65536) or b"token" in s.recv(65536)
    t0 = time.monotonic()
    r = cli("stop", "--now", "--pid-file", srv.pid_file)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    rest = read_all(s, 5)
    s.close()
    assert b"0\r\n\r\n" not in rest  # the stream (8 s of tokens) was cut, not finished
    assert took < 8  # quick: not the 8 s the stream needed nor graceful_timeout
    assert srv.proc.wait(10) == 0
    srv.assert_no_shm()


def test_daemon_start_status_stop(tmp_path):
    port_file_cfg = tmp_path / "d.toml"
    log = tmp_path / "error.log"
    pid_file = tmp_path / "d.pid"
    port_file_cfg.write_text(to_toml({"server": {"bind": ["127.0.0.1:0"], "workers": 1,
                                                 "pid_file": str(pid_file)},
                                      "log": {"error_log": str(log)}}))
    master = None
    try:
        r = cli("start", "--daemon", "-c", str(port_file_cfg), cwd=tmp_path, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        master = int(pid_file.read_text())
        assert f"master pid {master}" in r.stdout
        proc = psutil.Process(master)
        # detached: not our child, in a session of its own
        assert proc.ppid() != os.getpid() and os.getsid(master) != os.getsid(0)
        assert wait_for(lambda: "listening on" in log.read_text(), timeout=15)
        port = int(log.read_text().split("listening on 127.0.0.1:")[1].split()[0].rstrip(","))
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = read_all(s)
        assert data.startswith(b"HTTP/1.1 200")
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["workers"] == 1
        r = cli("status", "-c", str(port_file_cfg), cwd=tmp_path)
        assert r.returncode == 0 and str(master) in r.stdout
        # a second start through the same pid file is refused
        r = cli("start", "--daemon", "-c", str(port_file_cfg), cwd=tmp_path, timeout=30)
        assert r.returncode != 0 and "already running" in r.stderr  # told, not just logged
        assert "already running" in log.read_text()
        r = cli("stop", "-c", str(port_file_cfg), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert not psutil.pid_exists(master) or psutil.Process(master).status() == "zombie"
        master = None
        assert not pid_file.exists()
        assert not os.path.exists(f"/dev/shm/{block_name(str(pid_file))}")
        assert cli("status", "-c", str(port_file_cfg), cwd=tmp_path).returncode == 3
    finally:
        if master is not None:
            for p in [master] + [c.pid for c in psutil.Process(master).children()]:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.unlink(f"/dev/shm/{block_name(str(pid_file))}")
            except FileNotFoundError:
                pass


def test_stale_pid_file_naming_another_process_is_never_signalled(make_server):
    """After a crash the pid in the pid file may belong to another process by
    now. status, reload and stop must not believe it (stop killed a `sleep`):
    they say the file is stale and signal nothing; start replaces it."""
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        srv = make_server(workers=1, start=False)
        Path(srv.pid_file).write_text(f"{sleeper.pid}\n")
        stale = f"stale pid file {srv.pid_file}: pid {sleeper.pid} is 'sleep 300', " \
                "not a neurohttpd master"
        r = cli("status", "--pid-file", srv.pid_file)
        assert r.returncode == 3 and stale in r.stdout, r.stdout
        doc = json.loads(cli("status", "--json", "--pid-file", srv.pid_file).stdout)
        assert doc["running"] is False and "not a neurohttpd master" in doc["stale"]
        r = cli("reload", "--pid-file", srv.pid_file)
        assert r.returncode == 7 and stale in r.stderr, r.stderr
        for args in (["stop"], ["stop", "--now"]):
            r = cli(*args, "--pid-file", srv.pid_file, timeout=10)
            assert r.returncode == 0 and stale in r.stderr, r.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None, "an unrelated process was signalled"
        srv.start()
        assert Path(srv.pid_file).read_text().strip() == str(srv.pid)
        assert f"stale pid file {srv.pid_file} (pid {sleeper.pid} is 'sleep 300'" in srv.log()
        r = cli("status", "--pid-file", srv.pid_file)
        assert r.returncode == 0 and f"master pid {srv.pid}" in r.stdout
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
