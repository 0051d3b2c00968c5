"""The plugin lifecycle against real servers (issue 10 item 5, issue 13 item 4's
errors): when plugins load, their startup and shutdown hooks, the order of
before_request hooks, route collisions, after_response of a stream, and every
way a plugin can fail, each with its 500 (or error event) and its one log line
naming the plugin, with the connection and the worker still fine."""

from __future__ import annotations

import http.client
import json
import signal
from pathlib import Path

from server import Server, wait_for
from streamtools import RawStream, data_events


def plugin_dir(tmp: Path, **plugins: str) -> Path:
    d = tmp / "plugins"
    d.mkdir(parents=True, exist_ok=True)
    for name, code in plugins.items():
        (d / f"{name}.py").write_text(code)
    return d


def config(pdir: Path, *enabled: str, **more: object) -> dict:
    cfg: dict = {"plugins": {"paths": [str(pdir)], "enabled": list(enabled)}}
    for k, v in more.items():
        if k in ("server", "models", "log"):
            cfg[k] = v
        else:
            cfg["plugins"][k] = v
    return cfg


# ------------------------------------------------------------------ load and start
SLOW_SETUP = '''
import time
from neurohttp.plugins import Response

def setup(app, options):
    time.sleep(options["seconds"])      # a slow connect, a big file: blocks the loop
    @app.route("GET", "/slow-ready")
    def ready(request):
        return Response("ready")
'''


def test_a_setup_slower_than_worker_timeout_is_not_taken_for_a_hang(make_server, tmp_path):
    """Plugins load once the heartbeat runs: a setup() of 3 s with worker_timeout
    1 s starts its worker once, with no kill, no restart, no USR2 blamed."""
    pdir = plugin_dir(tmp_path, slow=SLOW_SETUP)
    srv = make_server(workers=1, config=config(pdir, "slow", server={"worker_timeout": 1},
                                               slow={"seconds": 3.0}))
    assert srv.request("GET", "/slow-ready")[2] == b"ready"
    assert srv.stats()["master"]["restarts"] == 0
    log = srv.log()
    assert "missed its heartbeat" not in log and "worker failed at start" not in log


def test_a_setup_past_setup_timeout_fails_the_start_naming_the_plugin(tmp_path):
    pdir = plugin_dir(tmp_path, slow=SLOW_SETUP)
    srv = Server(tmp_path / "srv", workers=1,
                 config=config(pdir, "slow", setup_timeout=1, slow={"seconds": 60.0}))
    try:
        srv.start(wait=False)
        code = srv.proc.wait(90)  # 5 tries of ~1.5 s with back-off
        log = srv.log()
        assert code == 3, log
        give_up = next(x for x in log.splitlines() if "giving up" in x)
        assert "plugin 'slow' setup took longer than [plugins] setup_timeout (1 s)" in give_up
        assert "missed its heartbeat" not in log
        srv.assert_no_shm()
    finally:
        srv.kill()


HOOKS = '''
import asyncio, os
from neurohttp.plugins import Response

def setup(app, options):
    state = {}

    @app.on_startup
    async def connect():
        await asyncio.sleep(0.2)          # e.g. a pool opening its connections
        state["loop"] = asyncio.get_running_loop()

    @app.on_shutdown
    async def close():
        await asyncio.sleep(0.05)
        with open(options["marker"], "a") as f:
            f.write(f"closed {os.getpid()}\\n")

    @app.route("GET", "/started")
    async def started(request):
        return Response.json({"started": "loop" in state,
                              "same_loop": state.get("loop") is asyncio.get_running_loop()})
'''


def test_startup_and_shutdown_hooks_run_on_the_workers_loop(make_server, tmp_path):
    marker = tmp_path / "closed.txt"
    pdir = plugin_dir(tmp_path, hooks=HOOKS)
    srv = make_server(workers=2, config=config(pdir, "hooks", hooks={"marker": str(marker)}))
    pids = srv.worker_pids()
    for _ in range(4):
        assert json.loads(srv.request("GET", "/started")[2]) == {"started": True,
                                                                 "same_loop": True}
    assert srv.stop() == 0
    assert sorted(marker.read_text().split()) == sorted(["closed"] * 2 + [str(p) for p in pids])


ORDER = '''
import asyncio
from neurohttp.plugins import Response

def setup(app, options):
    @app.before_request
    async def first(request):                  # an async hook ...
        await asyncio.sleep(0)
        request.state["seen"] = ["first"]

    @app.before_request
    def limiter(request):                      # ... must not skip the hooks after it
        request.state["seen"].append("limiter")
        if request.headers.get("x-over") == "1":
            return Response.json({"error": {"message": "over"}}, status=429)

    @app.before_request
    async def third(request):
        request.state["seen"].append("third")

    @app.route("GET", "/seen")
    def seen(request):
        return Response.json(request.state["seen"])
'''


def test_every_before_request_hook_runs_in_order_sync_or_async(make_server, tmp_path):
    pdir = plugin_dir(tmp_path, order=ORDER)
    srv = make_server(workers=1, config=config(pdir, "order"))
    status, _, body = srv.request("GET", "/seen")
    assert status == 200 and json.loads(body) == ["first", "limiter", "third"]
    # the limiter after the async hook is not bypassed, on core routes either
    for path in ("/seen", "/health"):
        assert srv.request("GET", path, headers={"x-over": "1"})[0] == 429


CLASH = '''
from neurohttp.plugins import Response

def setup(app, options):
    @app.route("GET", "/health")
    def mine(request):
        return Response("shadowed")
'''


def test_a_plugin_route_colliding_with_a_core_route_fails_the_start(tmp_path):
    pdir = plugin_dir(tmp_path, clash=CLASH)
    srv = Server(tmp_path / "srv", workers=1, config=config(pdir, "clash"))
    try:
        srv.start(wait=False)
        code = srv.proc.wait(60)
        log = srv.log()
        assert code == 3, log
        assert "plugin 'clash': route GET /health collides with a core route" in log
    finally:
        srv.kill()


STREAM_USAGE = '''
from neurohttp.plugins import Response, StreamingResponse

def setup(app, options):
    seen = []

    @app.after_response
    def record(request, response):
        if isinstance(response, StreamingResponse):
            u = request.usage
            seen.append(None if u is None else
                         {"outcome": u.outcome, "completion_tokens": u.completion_tokens,
                          "stream": u.stream})

    @app.route("GET", "/seen-streams")
    def streams(request):
        return Response.json(seen)
'''


def test_after_response_of_a_stream_runs_at_its_end_with_its_usage(make_server, tmp_path):
    pdir = plugin_dir(tmp_path, usage=STREAM_USAGE)
    srv = make_server(workers=1, config=config(
        pdir, "usage", models={"echo": {"provider": "echo", "token_delay_ms": 5}}))
    st = RawStream(srv.host, srv.port, "/v1/chat/completions",
                   {"model": "echo", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]})
    try:
        assert st.read_head()[0] == 200
        events = data_events(list(st.events()))
        assert events[-1] == "[DONE]"
    finally:
        st.close()
    got = wait_for(lambda: json.loads(srv.request("GET", "/seen-streams")[2]), 10,
                   what="the stream's after_response")
    assert got == [{"outcome": "finished", "completion_tokens": 5, "stream": True}]


# ------------------------------------------------------------------ a plugin failing
FAULTY = '''
from neurohttp.plugins import Response

def setup(app, options):
    @app.route("GET", "/dict-body")
    def dict_body(request):
        return Response({"a": 1})

    @app.route("GET", "/str-status")
    def str_status(request):
        return Response("fine", status="200")

    @app.route("GET", "/not-a-response")
    async def not_a_response(request):
        return {"hello": "world"}

    @app.route("GET", "/raises")
    def raises(request):
        raise RuntimeError("kaboom in the route")

    @app.before_request
    def before(request):
        if request.headers.get("x-boom") == "before":
            raise ValueError("kaboom before")

    @app.after_response
    def after(request, response):
        if request.headers.get("x-boom") == "after":
            raise KeyError("kaboom after")
        if request.headers.get("x-boom") == "after-status":
            response.status = "oops"

    @app.on_token
    def token(request, tok):
        n = request.state["tokens"] = request.state.get("tokens", 0) + 1
        if n == 2 and request.headers.get("x-boom") == "token":  # once some text went out
            raise ZeroDivisionError("kaboom in on_token")
        return tok
'''

# each bad answer: the request, what the single log line must say
FAULTS = [
    ("/dict-body", {}, "plugin 'faulty': route GET /dict-body (setup.<locals>.dict_body) "
                       "answered wrongly: body is dict, not bytes or str"),
    ("/str-status", {}, "plugin 'faulty': route GET /str-status (setup.<locals>.str_status) "
                        "answered wrongly: status '200' is not an int"),
    ("/not-a-response", {}, "plugin 'faulty': route GET /not-a-response "
                            "(setup.<locals>.not_a_response) answered wrongly: answer is dict"),
    ("/raises", {}, "plugin 'faulty': route GET /raises (setup.<locals>.raises) failed: "
                    "RuntimeError: kaboom in the route"),
    ("/health", {"x-boom": "before"}, "plugin 'faulty': before_request hook "
                                      "setup.<locals>.before failed on GET /health: "
                                      "ValueError: kaboom before"),
    ("/health", {"x-boom": "after"}, "plugin 'faulty': after_response hook "
                                     "setup.<locals>.after failed on GET /health: "
                                     "KeyError: 'kaboom after'"),
    ("/health", {"x-boom": "after-status"}, "plugin 'faulty': after_response hook "
                                            "setup.<locals>.after on GET /health answered "
                                            "wrongly: status 'oops'"),
]


def test_a_plugin_failing_gives_500_one_log_line_and_the_worker_serves_on(make_server,
                                                                           tmp_path):
    pdir = plugin_dir(tmp_path, faulty=FAULTY)
    srv = make_server(workers=1, config=config(pdir, "faulty"))
    [pid] = srv.worker_pids()
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        for path, headers, line in FAULTS:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            body = r.read()
            assert r.status == 500, (path, headers, r.status, body)
            # the same keep-alive connection answers the next request
            conn.request("GET", "/health")
            r2 = conn.getresponse()
            assert r2.status == 200 and json.loads(r2.read())["status"] == "ok"
            wait_for(lambda line=line: srv.log().count(line) == 1, 10, what=line)
    finally:
        conn.close()
    assert srv.worker_pids() == [pid]
    assert srv.stats()["master"]["restarts"] == 0


def test_an_on_token_hook_that_raises_ends_the_stream_with_an_error_event(make_server,
                                                                         tmp_path):
    pdir = plugin_dir(tmp_path, faulty=FAULTY)
    srv = make_server(workers=1, config=config(
        pdir, "faulty", models={"echo": {"provider": "echo", "token_delay_ms": 1}}))
    st = RawStream(srv.host, srv.port, "/v1/chat/completions",
                   {"model": "echo", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}, headers={"x-boom": "token"})
    try:
        status, _ = st.read_head()
        events = data_events(list(st.events()))
    finally:
        st.close()
    assert status == 200 and "[DONE]" not in events
    assert events[-1]["error"]["type"] == "server_error"
    line = ("plugin 'faulty': on_token hook setup.<locals>.token failed in model 'echo' "
            "(provider 'echo'): ZeroDivisionError: kaboom in on_token")
    wait_for(lambda: srv.log().count(line) == 1, 10, what=line)
    assert events[1]["choices"][0]["delta"]["content"] == "Hello,"  # the text before it
    # not streamed: a 500
    status, _, body = srv.request("POST", "/v1/chat/completions", headers={"x-boom": "token"},
                                  body=json.dumps({"model": "echo", "messages": [
                                      {"role": "user", "content": "hi"}]}))
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    assert srv.log().count(line) == 2
    assert srv.request("GET", "/health")[0] == 200


RAISING_PROVIDER = '''
class Broken:
    def __init__(self, options):
        pass

    async def stream(self, messages, params):
        yield "a"
        raise RuntimeError("the provider's bug")

def setup(app, options):
    app.add_provider("broken", Broken)
'''


def test_a_plugin_providers_exception_is_logged_with_its_traceback(make_server, tmp_path):
    pdir = plugin_dir(tmp_path, brk=RAISING_PROVIDER)
    srv = make_server(workers=1, config=config(pdir, "brk",
                                               models={"b": {"provider": "broken"}}))
    status, _, body = srv.request("POST", "/v1/chat", body=json.dumps({"prompt": "x",
                                                                       "model": "b"}))
    assert status == 500
    wait_for(lambda: "model 'b' (provider 'broken' of plugin 'brk') failed" in srv.log(), 10,
             what="the failure logged naming the plugin")
    log = srv.log()
    assert "Traceback (most recent call last)" in log and "RuntimeError: the provider's bug" in log
    assert srv.request("GET", "/health")[0] == 200
    srv.send_signal(signal.SIGUSR1)  # (the server is still the same process)
    assert srv.proc.poll() is None
