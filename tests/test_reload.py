"""Zero-downtime operations under load: reload (HUP / neurohttpd reload), worker
count changes (TTIN/TTOU and reload), bind changes, recycling and graceful stop.

Every test runs a Load (tests/load.py): threads opening a fresh connection per
request. A request whose connection the kernel accepted must get its complete
answer; `failed` counts those that did not, and must be empty.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from load import Load
from server import ROOT, wait_for

from neurohttp.stats import layout as L

ADDR = "127.0.0.1"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind((ADDR, 0))
        return s.getsockname()[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "neurohttp", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def wait_replaced(srv, old: set[int], n: int, timeout: float = 30) -> list[int]:
    """Wait until n workers run and none of `old` is among them."""
    def done():
        pids = srv.worker_pids()
        return pids if len(pids) == n and not (set(pids) & old) else None
    return wait_for(done, timeout, what=f"{n} workers, none of {sorted(old)}")


def wait_workers(srv, n: int, timeout: float = 30) -> list[int]:
    """Wait until exactly n workers run, all ready, and the master has reaped the rest."""
    def done():
        pids = srv.worker_pids()
        if len(pids) != n:
            return None
        s = srv.stats()
        states = [w["state"] for w in s["workers"]]
        return pids if states == ["ready"] * n and s["master"]["workers"] == n else None
    return wait_for(done, timeout, what=f"{n} ready workers")


def test_reload_under_load_replaces_every_worker_and_loses_nothing(make_server):
    srv = make_server(workers=2)
    load = Load([(ADDR, srv.port)]).start()
    try:
        load.wait_requests(50)
        for round_ in range(3):
            old = set(srv.worker_pids())
            if round_ == 1:
                r = cli("reload", "--pid-file", srv.pid_file)  # the command, not just the signal
                assert r.returncode == 0, r.stderr
            else:
                srv.send_signal(signal.SIGHUP)
            wait_replaced(srv, old, 2)
            load.wait_requests(50)
    finally:
        counts = load.stop()
    print(dict(counts))
    assert not load.failed, dict(counts)
    assert counts["ok"] > 300 and counts["refused"] == 0
    s = srv.stats()
    assert s["master"]["reloads"] == 3 and s["master"]["generation"] == 4
    assert s["master"]["restarts"] == 0  # retired gracefully, none died


def test_reload_applies_workers_and_bind_changes(make_server):
    p1, p2 = free_port(), free_port()
    cfg = {"server": {"bind": [f"{ADDR}:{p1}"], "workers": 2}}
    srv = make_server(workers=2, config=cfg, bind=None, cli_workers=False)
    load = Load([(ADDR, p1)]).start()
    try:
        load.wait_requests(30)
        # 2 -> 3 workers and a second address
        srv.write_config({"server": {"bind": [f"{ADDR}:{p1}", f"{ADDR}:{p2}"], "workers": 3}})
        srv.send_signal(signal.SIGHUP)
        srv.workers = 3
        wait_workers(srv, 3)
        # /health is rebuilt once a second
        wait_for(lambda: srv.get_json("/health")["workers"] == 3, 5, what="/health says 3")
        srv.port = p2
        assert srv.request("GET", "/health")[0] == 200
        load.wait_requests(30)
        # 3 -> 1 worker and the first address removed, while load runs on the second
        load.set_addrs([(ADDR, p2)])
        before = load.total()
        srv.write_config({"server": {"bind": [f"{ADDR}:{p2}"], "workers": 1}})
        srv.send_signal(signal.SIGHUP)
        srv.workers = 1
        wait_workers(srv, 1)
        assert load.total() > before  # the load went on through the reload
        load.wait_requests(100)
    finally:
        counts = load.stop()
    print(dict(counts))
    assert not load.failed, dict(counts)
    wait_for(lambda: srv.get_json("/health")["workers"] == 1, 5, what="/health says 1")
    # the removed address is closed: refused, not hanging
    import socket
    with socket.socket() as s:
        s.settimeout(5)
        assert s.connect_ex((ADDR, p1)) != 0
    assert f"generation 3 with 1 workers on {ADDR}:{p2}" in srv.log()


def test_bad_config_on_reload_keeps_the_running_one(make_server):
    srv = make_server(workers=2)
    pids = srv.worker_pids()
    srv.config_path.write_text("[server]\nworkers = 2\nmax_body_byts = 10\n")
    # neurohttpd reload -c checks the file first and refuses without signalling
    r = cli("reload", "-c", str(srv.config_path), "--pid-file", srv.pid_file)
    assert r.returncode == 1 and "server.max_body_byts" in r.stderr
    # a bare HUP: the master re-reads, refuses, and keeps serving with the old config
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in srv.log(), 10, what="refusal logged")
    line = next(x for x in srv.log().splitlines() if "reload refused" in x)
    assert "server.max_body_byts" in line and str(srv.config_path) in line and "ERROR" in line
    for _ in range(10):
        assert srv.request("GET", "/health")[0] == 200
    assert srv.worker_pids() == pids
    assert srv.stats()["master"]["reloads"] == 0


def test_ttin_ttou_under_load(make_server):
    srv = make_server(workers=2)
    load = Load([(ADDR, srv.port)]).start()
    try:
        load.wait_requests(30)
        srv.send_signal(signal.SIGTTIN)
        wait_workers(srv, 3)
        load.wait_requests(50)
        for n in (2, 1):
            srv.send_signal(signal.SIGTTOU)
            wait_workers(srv, n)
            load.wait_requests(50)
        srv.send_signal(signal.SIGTTOU)  # never below one
        wait_for(lambda: "never fewer than one worker" in srv.log(), 10, what="TTOU refused")
        load.wait_requests(50)
        assert len(srv.worker_pids()) == 1
        srv.send_signal(signal.SIGTTIN)
        wait_workers(srv, 2)
        load.wait_requests(50)
    finally:
        counts = load.stop()
    print(dict(counts))
    assert not load.failed, dict(counts)
    srv.workers = 2


def test_max_requests_recycles_under_load(make_server):
    srv = make_server(workers=2, config={"server": {"max_requests": 150,
                                                     "max_requests_jitter": 50}})
    first = set(srv.worker_pids())
    load = Load([(ADDR, srv.port)]).start()
    try:
        wait_for(lambda: not (set(srv.worker_pids()) & first), 60, what="both workers recycled")
        load.wait_requests(100)
    finally:
        counts = load.stop()
    print(dict(counts))
    assert not load.failed, dict(counts)
    recycled = [x for x in srv.log().splitlines() if "recycled: served" in x]
    assert len(recycled) >= 2
    # each worker went within its limit plus what the master saw before its next
    # check (it looks every 0.2 s at most)
    for line in recycled:
        n = int(line.split("served ")[1].split()[0])
        assert 150 <= n, line
    s = srv.stats()
    assert s["master"]["restarts"] == 0  # recycled, not died
    wait_workers(srv, 2)


def test_rss_limit_recycles(make_server):
    # Any worker is above 1 MiB, so each is recycled (replacement first) about
    # once a second: the load sees none of it.
    srv = make_server(workers=1, config={"server": {"max_worker_rss_mb": 1}})
    load = Load([(ADDR, srv.port)], threads=2).start()
    try:
        wait_for(lambda: srv.log().count("recycled: RSS") >= 2, 30, what="RSS recycling")
        load.wait_requests(50)
    finally:
        counts = load.stop()
    assert not load.failed, dict(counts)
    assert "over max_worker_rss_mb 1" in srv.log()


def test_graceful_stop_under_load_loses_nothing(make_server):
    srv = make_server(workers=2)
    load = Load([(ADDR, srv.port)]).start()
    try:
        load.wait_requests(100)
        code = srv.stop(signal.SIGTERM)
        # keep loading: the port is closed, connections are refused
        wait_for(lambda: load.counts["refused"] > 0, 10, what="a refused connection")
    finally:
        counts = load.stop()
    print(dict(counts))
    assert code == 0
    assert not load.failed, dict(counts)
    assert counts["refused"] > 0 and counts["ok"] >= 100


def test_reload_applies_limits_timeouts_and_models(make_server):
    srv = make_server(workers=2)
    status, _, body = srv.request("POST", "/v1/chat", body='{"prompt":"' + "x" * 2000 + '"}')
    assert status == 200 and b"Hello, AI world!" in body
    old = set(srv.worker_pids())
    srv.write_config({
        "server": {"max_body_bytes": 1000, "keepalive_timeout": 0.5},
        "models": {"echo": {"provider": "echo", "response": "reloaded answer"},
                   "second": {"provider": "echo"}}})
    srv.send_signal(signal.SIGHUP)
    wait_replaced(srv, old, 2)
    status, _, body = srv.request("POST", "/v1/chat", body='{"prompt":"' + "x" * 2000 + '"}')
    assert status == 413  # the new body limit
    status, _, body = srv.request("POST", "/v1/chat", body='{"prompt":"hi"}')
    assert status == 200 and b"reloaded answer" in body  # the new model table
    assert srv.request("POST", "/v1/chat", body='{"prompt":"hi","model":"second"}')[0] == 200
    import socket
    with socket.create_connection((ADDR, srv.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        s.settimeout(10)
        assert s.recv(1) == b""  # the new keep-alive timeout closes the idle connection
        assert time.monotonic() - t0 < 5  # the old one was 5 s


BLOCKER = '''
import os
import time
from neurohttp.plugins import Response

def setup(app, options):
    @app.route("GET", "/block")
    def block(request):
        open(options["entered"], "w").close()
        # Block the worker's loop until the test says (well below worker_timeout).
        deadline = time.monotonic() + 20
        while not os.path.exists(options["release"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        return Response("released")
'''


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queues of the listening sockets on
    127.0.0.1:port (/proc/net/tcp: a listener's rx_queue is its accept queue)."""
    total = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            _, local_port = fields[1].split(":")
            if int(local_port, 16) == port and fields[3] == "0A":  # LISTEN
                total += int(fields[4].split(":")[1], 16)
    return total


def test_connections_queued_on_a_removed_address_are_served(make_server, tmp_path):
    """Connections wait in the accept queue of an address a reload removes,
    while the only worker on it is blocked; the reload retires that worker. It
    must accept and answer them before it closes the socket for good."""
    import socket
    import threading
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    (pdir / "blocker.py").write_text(BLOCKER)
    entered, release = tmp_path / "entered", tmp_path / "release"
    p1, p2 = free_port(), free_port()
    plugins = {"paths": [str(pdir)], "enabled": ["blocker"],
               "blocker": {"entered": str(entered), "release": str(release)}}
    srv = make_server(workers=1, bind=None, cli_workers=False, config={
        "server": {"bind": [f"{ADDR}:{p1}", f"{ADDR}:{p2}"], "workers": 1},
        "plugins": plugins})
    [old] = srv.worker_pids()
    srv.port = p1
    blocker = threading.Thread(target=lambda: srv.request("GET", "/block", timeout=30),
                               daemon=True)
    blocker.start()
    queued = []
    try:
        wait_for(entered.exists, 10, what="the worker's loop blocked in the handler")
        srv.write_config({"server": {"bind": [f"{ADDR}:{p2}"], "workers": 1},
                          "plugins": plugins})
        srv.send_signal(signal.SIGHUP)
        # Queued on p1: the kernel completes the handshakes, nobody accepts yet.
        for _ in range(5):
            s = socket.create_connection((ADDR, p1), timeout=20)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            queued.append(s)
        wait_for(lambda: accept_queue(p1) == 5, 10, what="5 connections queued on p1")
        # the new worker (on p2 only) is up; the old one is told to retire while blocked
        wait_for(lambda: "old workers retiring" in srv.log(), 20, what="old worker retiring")
        assert accept_queue(p1) == 5 and old in srv.worker_pids()  # still queued, still there
    finally:
        release.touch()
    from server import read_all
    answers = [read_all(s, 20) for s in queued]
    for s in queued:
        s.close()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    blocker.join(20)
    wait_for(lambda: old not in srv.worker_pids(), 20, what="old worker gone")
    with socket.socket() as s:  # p1 is closed now
        assert s.connect_ex((ADDR, p1)) != 0
    srv.port = p2
    assert srv.request("GET", "/health")[0] == 200


def _models_served(srv) -> set[str]:
    import json
    status, _, body = srv.request("GET", "/v1/models")
    assert status == 200, body
    return {m["id"] for m in json.loads(body)["data"]}


def test_burst_of_hups_coalesces_and_applies_the_last_config(make_server):
    """Ten HUPs in a second, the config changed before each: a HUP that comes
    while a reload's generation is still starting waits for it to serve, then
    one more reload reads the config as it is then. No third generation starts
    beside the two (they filled every stats slot: the new generation never
    started and 'no free stats slot' was logged 5 times a second), nothing is
    lost, and the last config is the one served."""
    import threading

    from slots import Slots

    from neurohttp.stats import layout as L

    def config(i: int) -> dict:
        return {"models": {"echo": {"provider": "echo"}, f"gen{i}": {"provider": "echo"}}}

    srv = make_server(workers=2, config=config(0))
    assert _models_served(srv) == {"echo", "gen0"}
    starting_gens: set[int] = set()   # every generation seen starting
    most_starting = [0]
    stop = threading.Event()

    def watch() -> None:
        with Slots(srv) as slots:
            while not stop.is_set():
                gens = {s.generation for s in slots.read() if s.state == L.STATE_STARTING}
                starting_gens.update(gens)
                most_starting[0] = max(most_starting[0], len(gens))
                time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load = Load([(ADDR, srv.port)]).start()
    try:
        load.wait_requests(30)
        for i in range(1, 11):
            srv.write_config(config(i))
            srv.send_signal(signal.SIGHUP)
            time.sleep(0.1)
        wait_for(lambda: _models_served(srv) == {"echo", "gen10"}, 30,
                 what="the last config served")
        final = wait_workers(srv, 2)
        load.wait_requests(50)
    finally:
        counts = load.stop()
        stop.set()
        watcher.join(10)
    print(dict(counts), sorted(starting_gens))
    assert not load.failed, dict(counts)
    assert counts["refused"] == 0
    log = srv.log()
    assert "no free stats slot" not in log, log
    assert most_starting[0] == 1, sorted(starting_gens)   # never two generations starting
    s = srv.stats()
    # coalesced: fewer reloads than HUPs, the last generation is the one serving
    assert 2 <= s["master"]["reloads"] < 10
    with Slots(srv) as slots:
        live = slots.read()
        assert {x.generation for x in live} == {slots.generation()}
        assert sorted(x.pid for x in live) == final
    # both workers answer with the last config (round robin: consecutive connections alternate)
    for _ in range(6):
        assert _models_served(srv) == {"echo", "gen10"}


def test_reload_with_a_non_finite_value_is_refused_and_the_old_generation_serves(make_server):
    """worker_timeout = inf on reload crashed the master (OverflowError) and
    took every worker with it; token_delay_ms = inf hung that model."""
    srv = make_server(workers=2, config={"models": {"echo": {"provider": "echo"}}})
    pids = srv.worker_pids()
    load = Load([(ADDR, srv.port)]).start()
    try:
        load.wait_requests(30)
        bad = [({"server": {"worker_timeout": float("inf")}}, "server.worker_timeout"),
               ({"models": {"echo": {"provider": "echo", "token_delay_ms": float("inf")}}},
                "models.echo.token_delay_ms"),
               ({"server": {"graceful_timeout": float("nan")}}, "server.graceful_timeout")]
        for n, (cfg, key) in enumerate(bad, 1):
            srv.write_config(cfg)
            srv.send_signal(signal.SIGHUP)
            wait_for(lambda n=n: srv.log().count("reload refused") == n, 10, what="refusal logged")
            line = [x for x in srv.log().splitlines() if "reload refused" in x][-1]
            assert key in line and "finite" in line and str(srv.config_path) in line, line
            load.wait_requests(30)
            assert srv.worker_pids() == pids
    finally:
        counts = load.stop()
    assert not load.failed and counts["refused"] == 0, dict(counts)
    assert srv.stats()["master"]["reloads"] == 0
    # a good config still reloads
    srv.write_config({"models": {"echo": {"provider": "echo", "token_delay_ms": 1}}})
    srv.send_signal(signal.SIGHUP)
    wait_replaced(srv, set(pids), 2)
    assert srv.stats()["master"]["generation"] == 2


def test_reload_failing_while_applying_keeps_the_running_generation(make_server, tmp_path):
    """An error that no schema check catches, met while applying the reload
    (here: the new error log cannot be opened), used to escape the master's
    loop and kill every worker. The reload is refused, logged with its cause,
    and the running generation and its log keep going."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log directory would be\n")
    srv = make_server(workers=2)
    pids = srv.worker_pids()
    from server import to_toml
    srv.config_path.write_text(to_toml({"server": {"max_body_bytes": 1000},
                                        "log": {"error_log": str(blocker / "error.log")}}))
    srv.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in srv.log(), 10, what="refusal logged")
    line = next(x for x in srv.log().splitlines() if "reload refused" in x)
    assert "log.error_log" in line and "cannot open" in line and str(srv.config_path) in line
    assert srv.worker_pids() == pids
    for _ in range(10):
        assert srv.request("GET", "/health")[0] == 200
    # the old limits still apply (max_body_bytes was not taken from the refused file)
    assert srv.request("POST", "/v1/chat", body='{"prompt":"' + "x" * 2000 + '"}')[0] == 200
    srv.send_signal(signal.SIGUSR1)  # the old log is still the log
    wait_for(lambda: "log files reopened" in srv.log(), 10, what="USR1 logged")
    assert srv.stats()["master"]["reloads"] == 0


def test_worker_outstaying_graceful_timeout_is_killed_one_second_after_it(make_server):
    """README and ARCHITECTURE.md: a retiring worker is killed at
    graceful_timeout + 1 s (its own drain ends at graceful_timeout + 0.5 s).
    A stopped worker cannot exit: the master's log shows when it was killed."""
    import datetime
    srv = make_server(workers=1, config={"server": {"graceful_timeout": 1.0,
                                                     "worker_timeout": 120}})
    [old] = srv.worker_pids()
    os.kill(old, signal.SIGSTOP)
    try:
        srv.send_signal(signal.SIGHUP)
        wait_for(lambda: "did not exit in time" in srv.log(), 20, what="the stopped worker killed")
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def stamp(needle: str) -> datetime.datetime:
        line = next(x for x in srv.log().splitlines() if needle in x)
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    waited = (stamp("did not exit in time") - stamp("old workers retiring")).total_seconds()
    # 1 + 1 s, give or take the master's 0.2 s loop; the code said + 5 s
    assert 1.9 <= waited <= 3.0, waited
    wait_replaced(srv, {old}, 1)
    assert srv.request("GET", "/health")[0] == 200


def _memory_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


def test_master_memory_stays_flat_over_reloads_and_bursts(make_server):
    """A soak saw the master's RSS grow by about 1 MiB per reload and 8 MiB per
    burst of HUPs (57 -> 70 MiB in 60 s). It was shared memory: the master
    touched the pages of a dead worker's stats slot when it folded and cleared
    it, and they stayed in its page tables after the slot was freed, one more
    slot's worth each time a reload used a slot not used before. The master
    must hold pages of slot 0 and of the live workers' slots only, and its own
    heap must not grow with reloads."""
    from neurohttp.stats.block import block_name
    srv = make_server(workers=2)
    with open(f"/dev/shm/{block_name(srv.pid_file)}", "rb") as f:
        head = memoryview(f.read(L.HEADER_WORDS * 8)).cast("Q")
        slot_kib = head[L.H_SLOT_WORDS] * 8 // 1024
    load = Load([(ADDR, srv.port)]).start()

    def reload(hups: int) -> None:
        generation = srv.stats()["master"]["generation"]
        for _ in range(hups):
            srv.send_signal(signal.SIGHUP)
            time.sleep(0.1)   # a burst: HUPs while the new generation starts
        wait_for(lambda: srv.stats()["master"]["generation"] > generation, 30,
                 what="the reload's generation")
        wait_workers(srv, 2)
    try:
        load.wait_requests(50)
        reload(1)
        first = _memory_kib(srv.pid)
        for _ in range(6):
            reload(1)
            load.wait_requests(20)
            reload(4)
            load.wait_requests(20)
        last = _memory_kib(srv.pid)
    finally:
        counts = load.stop()
    assert not load.failed, dict(counts)
    assert srv.stats()["master"]["reloads"] >= 13
    assert last["RssShmem"] <= 3 * slot_kib, (first, last, slot_kib)  # slot 0 and 2 workers'
    assert last["VmRSS"] - first["VmRSS"] < 4096, (first, last)
