"""The plugin API's pieces against real servers (issue 13 item 4): exact shared
counters across workers, a once-per-server timer that survives its worker's
kill, plugin figures in /stats and /metrics, `neurohttpd check` naming a bad
option, and a HUP that picks up changed plugin code with no request lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server import ROOT, wait_for
from test_plugin_lifecycle import config, plugin_dir

COUNTER = '''
from neurohttp.plugins import Response

def setup(app, options):
    hits = app.counter("hits")

    @app.route("POST", "/hit")
    def hit(request):
        return Response.json({"value": hits.add(1)})

    @app.route("GET", "/hits")
    def read(request):
        return Response.json({"value": hits.get()})
'''


def test_a_shared_counter_is_exact_across_workers(make_server, tmp_path):
    """30 clients add to one counter through 2 workers: every add returns a
    distinct value (add and read are one step) and none is lost."""
    pdir = plugin_dir(tmp_path, ctr=COUNTER)
    srv = make_server(workers=2, config=config(pdir, "ctr"))

    def client(_: int) -> list[int]:
        return [json.loads(srv.request("POST", "/hit")[2])["value"] for _ in range(10)]

    with ThreadPoolExecutor(30) as pool:
        values = [v for vs in pool.map(client, range(30)) for v in vs]
    assert sorted(values) == list(range(1, 301))
    assert json.loads(srv.request("GET", "/hits")[2])["value"] == 300
    # both workers served some (the counter is shared, not per worker)
    assert all(w["requests"] > 0 for w in srv.stats()["workers"])


TIMER = '''
import os, time

def setup(app, options):
    def tick():
        with open(options["once"], "a") as f:
            f.write(f"{os.getpid()} {round(time.time() / 0.5)}\\n")

    def each():
        with open(options["each"], "a") as f:
            f.write(f"{os.getpid()}\\n")

    app.every(0.5, tick, once_per_server=True)
    app.every(0.5, each)
'''


def _lines(p: Path) -> list[tuple[int, int]]:
    if not p.exists():
        return []
    return [(int(a), int(b)) for a, b in (x.split() for x in p.read_text().splitlines() if x)]


def test_a_once_per_server_timer_runs_in_one_worker_and_survives_its_kill(make_server,
                                                                          tmp_path):
    once, each = tmp_path / "once.txt", tmp_path / "each.txt"
    pdir = plugin_dir(tmp_path, timer=TIMER)
    srv = make_server(workers=2, config=config(pdir, "timer",
                                               timer={"once": str(once), "each": str(each)}))
    wait_for(lambda: len(_lines(once)) >= 6, 20, what="six periods")
    # a per-worker timer runs in both workers
    assert len(set(each.read_text().split())) == 2
    got = _lines(once)
    periods = [k for _, k in got]
    assert len(periods) == len(set(periods)), got  # never twice in a period
    victim = got[-1][0]
    os.kill(victim, signal.SIGKILL)
    n = len(got)
    after = wait_for(lambda: [x for x in _lines(once)[n:] if x[0] != victim][4:], 20,
                     what="the timer running again in another worker")
    assert after
    got = _lines(once)
    periods = [k for _, k in got]
    assert len(periods) == len(set(periods)), got
    srv.workers = 2
    wait_for(lambda: len(srv.worker_pids()) == 2 and victim not in srv.worker_pids(), 20,
             what="the killed worker replaced")


METRICS = '''
from neurohttp.plugins import Response

def setup(app, options):
    served = app.metric("served", help="Requests the plugin answered.")
    depth = app.metric("queue_depth", kind="gauge")

    @app.route("POST", "/serve")
    def serve(request):
        served.add(1)
        depth.set(int(request.query.get("depth", "0")))
        return Response("ok")
'''


def test_plugin_figures_appear_in_stats_and_metrics(make_server, tmp_path):
    pdir = plugin_dir(tmp_path, figs=METRICS)
    srv = make_server(workers=2, config=config(pdir, "figs"))
    for i in range(7):
        assert srv.request("POST", f"/serve?depth={i}")[0] == 200
    assert srv.stats()["plugins"] == {"figs": {"served": 7, "queue_depth": 6}}
    text = srv.request("GET", "/metrics")[2].decode()
    assert "# TYPE neurohttp_plugin_figs_served_total counter" in text
    assert "neurohttp_plugin_figs_served_total 7\n" in text
    assert "# HELP neurohttp_plugin_figs_served_total Requests the plugin answered." in text
    assert "# TYPE neurohttp_plugin_figs_queue_depth gauge" in text
    assert "neurohttp_plugin_figs_queue_depth 6\n" in text


SCHEMA = '''
from neurohttp.plugins import OptionError

OPTIONS = {"rpm": int, "key": str, "burst": int}

def validate(options):
    if options.get("rpm", 1) < 1:
        raise OptionError("rpm", "must be at least 1")

def setup(app, options):
    pass
'''


def _check(cfg: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "neurohttp", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_check_names_the_plugin_and_the_key_of_a_bad_option(tmp_path):
    pdir = plugin_dir(tmp_path, lim=SCHEMA)
    cfg = tmp_path / "n.toml"
    head = f'[plugins]\npaths = ["{pdir}"]\nenabled = ["lim"]\n\n[plugins.lim]\n'
    for table, expect in [
        ('rpm = "5"\n', "plugins.lim.rpm: must be an integer, not '5' (plugin 'lim')"),
        ("rmp = 5\n", "plugins.lim.rmp: unknown option (known: burst, key, rpm) (plugin 'lim')"),
        ("rpm = 0\n", "plugins.lim.rpm: must be at least 1 (plugin 'lim')"),
    ]:
        cfg.write_text(head + table)
        r = _check(cfg)
        assert r.returncode == 1, r
        assert f"{cfg}: {expect}" in r.stderr, r.stderr
    cfg.write_text(head + 'rpm = 5\nkey = "ip"\n')
    r = _check(cfg)
    assert r.returncode == 0 and "is valid" in r.stdout, r.stderr


VERSIONED = '''
from neurohttp.plugins import Response

def setup(app, options):
    served = app.counter("served")   # shared state outlives the reload

    @app.route("GET", "/version")
    def version(request):
        return Response("{v} %d" % served.add(1))
'''


def test_a_hup_picks_up_changed_plugin_code_with_no_request_lost(make_server, tmp_path):
    pdir = plugin_dir(tmp_path, ver=VERSIONED.replace("{v}", "v1"))
    srv = make_server(workers=2, config=config(pdir, "ver"))
    seen: dict[str, int] = {}
    numbers: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                status, _, body = srv.request("GET", "/version", timeout=10)
                outcome = body.decode() if status == 200 else f"status {status}"
                if status == 200:
                    version, n = outcome.split()
                    outcome = version
                    with lock:
                        numbers.append(int(n))
            except Exception as e:  # a lost request
                outcome = f"failed: {type(e).__name__}"
            with lock:
                seen[outcome] = seen.get(outcome, 0) + 1

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: seen.get("v1", 0) > 50, 20, what="load on v1")
        (pdir / "ver.py").write_text(VERSIONED.replace("{v}", "v2"))
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: seen.get("v2", 0) > 50, 30, what="the new code answering")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert set(seen) == {"v1", "v2"}, seen
    # the counter went on across the reload: every add returned a new value, none lost
    assert sorted(numbers) == list(range(1, len(numbers) + 1))
    wait_for(lambda: srv.stats()["master"]["reloads"] == 1, 10, what="the reload counted")
