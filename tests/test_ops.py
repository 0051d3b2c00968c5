"""Operations with real processes and signals: hung workers, crash loops, log
files and USR1, the access log, `neurohttpd status`, shared memory however the
master ends, and plugins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from server import ROOT, Server, wait_for

from neurohttp.stats.block import block_name

BLOCKING_PLUGIN = '''
import time
from neurohttp.plugins import Response

def setup(app, options):
    @app.route("GET", "/block")
    def block_the_loop(request):
        time.sleep(options.get("seconds", 60))   # a handler that blocks the event loop
        return Response("unblocked")
'''

FAILING_PLUGIN = '''
def setup(app, options):
    raise RuntimeError("plugin cannot reach its database")
'''

HELLO_PLUGIN = '''
from neurohttp.plugins import Response

def setup(app, options):
    @app.route("GET", "/hello")
    def hello(request):
        return Response.json({"hello": options.get("name", "world"), "q": request.query})

    @app.before_request
    def block(request):
        if request.headers.get("x-block") == "1":
            return Response.json({"error": {"message": "blocked"}}, status=403)

    @app.after_response
    def tag(request, response):
        response.headers["x-plugin"] = "hello"

    @app.on_token
    def upper(request, token):
        return token.upper()
'''

REVERSE_PLUGIN = '''
import asyncio

class ReverseProvider:
    def __init__(self, options):
        self.suffix = options.get("suffix", "")

    async def stream(self, messages, params):
        words = (messages[-1]["content"][::-1] + self.suffix).split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(0)
            yield word if i == 0 else " " + word

def setup(app, options):
    app.add_provider("reverse", ReverseProvider)
'''


def write_plugin(tmp: Path, name: str, code: str) -> Path:
    d = tmp / "myplugins"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.py").write_text(code)
    return d


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "neurohttp", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=cwd)


# ------------------------------------------------------------------ heartbeat
def test_blocked_loop_is_killed_replaced_and_the_request_named(make_server, tmp_path):
    pdir = write_plugin(tmp_path, "blocker", BLOCKING_PLUGIN)
    srv = make_server(workers=1, config={
        "server": {"worker_timeout": 2},
        "plugins": {"paths": [str(pdir)], "enabled": ["blocker"], "blocker": {"seconds": 120}}})
    [victim] = srv.worker_pids()
    result: dict = {}

    def blocked_request():
        try:
            result["r"] = srv.request("GET", "/block?who=test", timeout=30)
        except Exception as e:  # the worker is killed under it
            result["e"] = e

    t = threading.Thread(target=blocked_request, daemon=True)
    t0 = time.monotonic()
    t.start()
    # worker_timeout 2 s, then SIGUSR2 and SIGKILL; allow for a loaded machine
    new = wait_for(lambda: [p for p in srv.worker_pids() if p != victim], 20,
                   what="replacement of the hung worker")
    took = time.monotonic() - t0
    t.join(10)
    assert "e" in result  # the stuck request's connection died with its worker
    # not before worker_timeout, counted from the last heartbeat, which the tick
    # stamps every 0.5 s: it can be up to one tick older than the block
    assert took >= 2.0 - 0.5
    log = srv.log()
    assert "missed its heartbeat" in log
    assert "stuck on GET /block from 127.0.0.1" in log      # the worker's own dump
    assert "block_the_loop" in log and "time.sleep" in log   # ... with the stack
    assert f"(pid {victim}) killed after missing its heartbeat; it was stuck on GET /block" in log
    srv.workers = 1
    wait_for(lambda: srv.request("GET", "/health")[0] == 200, 10, what="serving again")
    s = srv.stats()
    assert s["master"]["restarts"] == 1 and [w["pid"] for w in s["workers"]] == new


# ------------------------------------------------------------------ crash loop
def test_no_worker_can_start_master_gives_up_with_the_error(tmp_path):
    pdir = write_plugin(tmp_path, "broken", FAILING_PLUGIN)
    srv = Server(tmp_path / "srv", workers=2, config={
        "plugins": {"paths": [str(pdir)], "enabled": ["broken"]}})
    try:
        srv.start(wait=False)
        code = srv.proc.wait(60)  # 5 tries with back-off 0.1, 0.2, 0.4, 0.8 s
        log = srv.log()
        assert code == 3, log
        assert "no worker can start (5 tries); giving up" in log
        give_up = next(x for x in log.splitlines() if "giving up" in x)
        assert "RuntimeError: plugin cannot reach its database" in give_up
        assert "next try in 0.1 s" in log and "next try in 0.8 s" in log  # the back-off
        srv.assert_no_shm()
        assert not os.path.exists(srv.pid_file)
    finally:
        srv.kill()


def test_worker_dying_at_start_after_reload_keeps_old_workers(make_server, tmp_path):
    pdir = write_plugin(tmp_path, "broken", FAILING_PLUGIN)
    srv = make_server(workers=1)
    old = srv.worker_pids()
    cfg = dict(srv.config)
    cfg["plugins"] = {"paths": [str(pdir)], "enabled": ["broken"]}
    srv.write_config(cfg)
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: srv.log().count("worker failed at start") >= 3, 30, what="failed starts")
    # the old worker still serves; the master neither gives up nor stops it
    assert srv.request("GET", "/health")[0] == 200
    assert old[0] in srv.worker_pids() and srv.proc.poll() is None


# ------------------------------------------------------------------ logs
def test_usr1_reopens_error_and_access_logs(make_server, tmp_path):
    logs = tmp_path / "logs"
    srv = make_server(workers=2, config={"log": {"error_log": str(logs / "error.log"),
                                                 "access_log": str(logs / "access.log")}})
    for _ in range(5):
        assert srv.request("GET", "/health")[0] == 200
    wait_for(lambda: len((logs / "access.log").read_text().splitlines()) >= 5, 5,
             what="access log flushed")
    # logrotate's create mode: move the files away, signal, expect new files
    os.rename(logs / "access.log", logs / "access.log.1")
    os.rename(logs / "error.log", logs / "error.log.1")
    srv.send_signal(signal.SIGUSR1)
    wait_for(lambda: (logs / "error.log").exists(), 10, what="new error log")

    # Each worker reopens when its loop handles the signal; until then its lines
    # still go to the renamed file (as with nginx). Keep asking until the new
    # file has lines.
    def rotated() -> bool:
        assert srv.request("GET", "/stats?after=rotate")[0] == 200
        new = logs / "access.log"
        return new.exists() and "/stats?after=rotate" in new.read_text()
    wait_for(rotated, 15, interval=0.1, what="new access log written")
    new = [json.loads(x) for x in (logs / "access.log").read_text().splitlines()]
    assert new and {x["path"] for x in new} == {"/stats?after=rotate"}  # the target as sent
    old = [json.loads(x) for x in (logs / "access.log.1").read_text().splitlines()]
    assert sum(x["path"] == "/health" for x in old) >= 5  # nothing written before is lost
    assert {x["path"] for x in old} <= {"/health", "/stats?after=rotate"}
    assert "log files reopened" in (logs / "error.log").read_text()
    assert "listening on" in (logs / "error.log.1").read_text()


def test_access_log_lines(make_server, tmp_path):
    path = tmp_path / "access.log"
    srv = make_server(workers=1, config={"log": {"access_log": str(path)}})
    assert srv.request("POST", "/v1/chat", body='{"prompt":"hello there"}')[0] == 200
    assert srv.request("POST", "/v1/chat", body='{"prompt":"hi","stream":true}')[0] == 200
    assert srv.request("GET", "/missing")[0] == 404
    srv.raw(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n")  # refused by the parser
    def mine():  # the readiness probes of /health come first; then these four
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        rest = [x for x in lines if x["path"] != "/health"]
        return (lines, rest) if len(rest) >= 4 else None
    lines, rest = wait_for(mine, 10, what="four access lines")
    chat, stream, missing, bad = rest[:4]
    for x in lines:
        assert set(x) == {"time", "client", "method", "path", "status", "bytes", "duration",
                          "model", "tokens", "prompt_tokens", "completion_tokens",
                          "deployment", "key"}
        assert x["deployment"] is None  # the echo model: no upstream
        assert x["key"] is None  # no [auth]: no key name (tests/test_auth.py has them)
    assert chat["method"] == "POST" and chat["status"] == 200 and chat["client"] == "127.0.0.1"
    assert chat["model"] == "echo" and chat["tokens"] == 2 + 5  # prompt + completion
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (2, 5)
    assert chat["bytes"] > 100 and chat["duration"] >= 0 and chat["time"].endswith("Z")
    assert stream["model"] == "echo" and stream["tokens"] == 1 + 5 and stream["bytes"] > 100
    assert missing["status"] == 404 and missing["model"] is None
    assert bad["status"] == 400 and bad["method"] is None


def _files_holding_a_request(srv) -> list[str]:
    """Send one request with a unique target, stop the server (a draining worker
    flushes its access log before it exits), and return every file that holds
    that target: under the server's directory, or open in the worker (an access
    log elsewhere)."""
    import uuid
    [worker] = srv.worker_pids()
    opened = {f.path for f in psutil.Process(worker).open_files()}
    target = f"/health?probe={uuid.uuid4().hex}"
    assert srv.request("GET", target)[0] == 200
    assert srv.stop() == 0
    candidates = opened | {str(p) for p in srv.tmp.rglob("*") if p.is_file()}
    found = []
    for path in sorted(candidates):
        if path.startswith("/dev/shm/"):
            continue
        try:
            if target.encode() in Path(path).read_bytes():
                found.append(path)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("where", ["relative", "elsewhere"])
def test_access_log_on_writes_the_request_where_it_is_told(make_server, tmp_path, where):
    """The control for the test below: the same probe finds a logged request,
    whether the log is in the server's directory or outside it."""
    path = "access.log" if where == "relative" else str(tmp_path / "elsewhere" / "a.log")
    srv = make_server(workers=1, config={"log": {"access_log": path}})
    expected = srv.tmp / path if where == "relative" else Path(path)
    assert _files_holding_a_request(srv) == [str(expected)]


def test_access_log_off_writes_nothing(make_server):
    """No access_log key: the default is off, and no file anywhere (under the
    server's directory, or open in the worker) receives the request."""
    srv = make_server(workers=1)
    assert "access_log" not in srv.config.get("log", {})
    assert _files_holding_a_request(srv) == []


def test_error_log_levels(make_server, tmp_path):
    path = tmp_path / "error.log"
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = make_server(workers=1, config={"log": {"level": "warning", "error_log": str(path)}},
                      bind=f"127.0.0.1:{port}", start=False)
    srv.port = port  # "listening on" is an info line: not logged at this level
    srv.start()
    os.kill(srv.worker_pids()[0], signal.SIGKILL)
    wait_for(lambda: "replacing it" in path.read_text(), 10, what="warning logged")
    text = path.read_text()
    assert "[WARNING]" in text and "[INFO]" not in text  # info is below the level


# ------------------------------------------------------------------ status
def test_status_json_and_text(make_server):
    srv = make_server(workers=2)
    for _ in range(7):
        srv.request("GET", "/health")
    r = cli("status", "--json", "--pid-file", srv.pid_file)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["running"] is True
    assert st["master"]["pid"] == srv.pid
    assert st["master"]["config"] == str(srv.config_path)
    assert isinstance(st["master"]["uptime"], int) and st["master"]["rss_mb"] > 1
    ws = st["workers"]
    assert sorted(w["pid"] for w in ws) == srv.worker_pids()
    for w in ws:
        assert w["age"] >= 0 and w["rss_mb"] > 1 and w["cpu_s"] >= 0
        assert 0 <= w["cpu_percent"] <= 200 and w["state"] == "ready"
    assert sum(w["requests"] for w in ws) >= 7
    r = cli("status", "--pid-file", srv.pid_file)
    assert r.returncode == 0
    assert f"master pid {srv.pid}" in r.stdout and str(srv.config_path) in r.stdout
    for pid in srv.worker_pids():
        assert str(pid) in r.stdout
    assert "RSS" in r.stdout and "CPU" in r.stdout
    srv.stop()
    r = cli("status", "--json", "--pid-file", srv.pid_file)
    assert r.returncode == 3 and json.loads(r.stdout)["running"] is False


# ------------------------------------------------------------------ shared memory
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_block_unlinked_on_every_signal(make_server, sig):
    srv = make_server(workers=1)
    assert os.path.exists(f"/dev/shm/{block_name(srv.pid_file)}")
    assert srv.stop(sig) == 0  # stop() asserts the block is gone


MASTER_FAILS = '''
import sys
from neurohttp import config, logs
from neurohttp.master import arbiter

cfg = config.load(sys.argv[1], {"server": {"pid_file": sys.argv[2], "workers": 1}})
logs.setup("info", "-")
calls = [0]
real = arbiter.Master._check_heartbeats

def failing(self):
    calls[0] += 1
    if calls[0] == 5:
        raise RuntimeError("injected master failure")
    return real(self)

arbiter.Master._check_heartbeats = failing
sys.exit(arbiter.Master(cfg).run())
'''


def test_block_unlinked_when_the_master_raises(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(MASTER_FAILS)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nbind = ["127.0.0.1:0"]\n')
    pid_file = str(tmp_path / "m.pid")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(script), str(cfg), pid_file], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 1
    assert "injected master failure" in p.stderr and "master failed" in p.stderr
    assert not os.path.exists(f"/dev/shm/{block_name(pid_file)}")
    assert not os.path.exists(pid_file)


# ------------------------------------------------------------------ plugins
def test_plugin_api(make_server, tmp_path):
    pdir = write_plugin(tmp_path, "hello", HELLO_PLUGIN)
    srv = make_server(workers=1, config={
        "plugins": {"paths": [str(pdir)], "enabled": ["hello"], "hello": {"name": "ops"}}})
    status, headers, body = srv.request("GET", "/hello?a=1")
    assert status == 200 and json.loads(body) == {"hello": "ops", "q": {"a": "1"}}
    assert headers["x-plugin"] == "hello"
    status, _, body = srv.request("GET", "/hello", headers={"x-block": "1"})
    assert status == 403 and json.loads(body)["error"]["message"] == "blocked"
    status, _, body = srv.request("POST", "/v1/chat", body='{"prompt":"x"}')
    assert json.loads(body)["response"] == "HELLO, AI WORLD!"


def test_plugin_provider_named_in_models(make_server, tmp_path):
    """app.add_provider(): a [models] table names the plugin's provider, gets its own
    keys, and the model answers on every API, streamed or not, with usage."""
    pdir = write_plugin(tmp_path, "rev", REVERSE_PLUGIN)
    srv = make_server(workers=1, config={
        "plugins": {"paths": [str(pdir)], "enabled": ["rev"]},
        "models": {"echo": {"provider": "echo"},
                   "backwards": {"provider": "reverse", "suffix": "!"}}})
    status, _, body = srv.request("POST", "/v1/chat",
                                  body='{"prompt": "abc def", "model": "backwards"}')
    doc = json.loads(body)
    assert status == 200 and doc["response"] == "fed cba!" and doc["model"] == "backwards"
    assert doc["usage"]["completion_tokens"] > 0
    status, _, body = srv.request("POST", "/v1/chat", body=json.dumps(
        {"prompt": "abc def", "model": "backwards", "stream": True}))
    lines = [json.loads(x) for x in body.decode().splitlines()]
    assert "".join(x["token"] for x in lines[:-1]) == "fed cba!" and lines[-1]["done"]
    status, _, body = srv.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": "backwards", "messages": [{"role": "user", "content": "xy z"}]}))
    assert json.loads(body)["choices"][0]["message"]["content"] == "z yx!"
    ids = [m["id"] for m in json.loads(srv.request("GET", "/v1/models")[2])["data"]]
    assert ids == ["echo", "backwards"]
    assert json.loads(srv.request("POST", "/v1/chat", body='{"prompt": "x"}')[2])[
        "response"] == "Hello, AI world!"


def test_unknown_provider_is_named_by_check(tmp_path):
    pdir = write_plugin(tmp_path, "rev", REVERSE_PLUGIN)
    cfg = tmp_path / "c.toml"
    plugins = f'[plugins]\npaths = ["{pdir}"]\nenabled = ["rev"]\n\n'
    cfg.write_text(plugins + '[models.a]\nprovider = "reverse"\nsuffix = "?"\n')
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 0 and "models a" in r.stdout, r.stderr
    cfg.write_text(plugins + '[models.a]\nprovider = "revers"\n')  # a typo
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 1 and str(cfg) in r.stderr
    assert "models.a.provider: unknown provider 'revers'" in r.stderr
    assert "added by plugins: reverse" in r.stderr
    cfg.write_text('[models.a]\nprovider = "reverse"\n')  # no plugin could add it
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 1 and "models.a.provider: unknown provider 'reverse'" in r.stderr
    assert "plugins.enabled is empty" in r.stderr


def test_worker_with_an_unknown_provider_fails_with_its_name(tmp_path):
    pdir = write_plugin(tmp_path, "rev", REVERSE_PLUGIN)
    srv = Server(tmp_path / "srv", workers=1, config={
        "plugins": {"paths": [str(pdir)], "enabled": ["rev"]},
        "models": {"a": {"provider": "revers"}}})
    try:
        srv.start(wait=False)
        code = srv.proc.wait(60)
        assert code == 3, srv.log()
        give_up = next(x for x in srv.log().splitlines() if "giving up" in x)
        assert "models.a.provider: unknown provider 'revers'" in give_up
        srv.assert_no_shm()
    finally:
        srv.kill()


def test_plugin_options_for_a_plugin_not_enabled_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\nenabled = []\n\n[plugins.helo]\nname = "x"\n')
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 1 and "plugins.helo" in r.stderr and str(cfg) in r.stderr
