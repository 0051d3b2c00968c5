"""The master as a process: binding, graceful and quick stops, stale shared memory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from server import ROOT, Server, wait_for

from neurohttp.stats.block import block_name

SLOW_ECHO = {"models": {"echo": {"provider": "echo", "token_delay_ms": 300,
                                 "response": "a b c d e f"}}}


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def start_cli(tmp, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "neurohttp", "start", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp)


class StreamReader(threading.Thread):
    """Reads one streamed /v1/chat answer on its own connection, recording when
    each chunk arrives."""

    def __init__(self, srv: Server) -> None:
        super().__init__(daemon=True)
        self.srv = srv
        self.data = b""
        self.first = threading.Event()
        self.error: BaseException | None = None
        self.closed_after = False

    def run(self) -> None:
        body = b'{"prompt":"go","stream":true}'
        try:
            with socket.create_connection((self.srv.host, self.srv.port), timeout=15) as s:
                s.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body))
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    self.data += b
                    if b'"token"' in self.data:
                        self.first.set()
                    if self.data.endswith(b"0\r\n\r\n"):
                        # a draining worker closes the connection after the stream
                        self.closed_after = s.recv(1) == b""
                        break
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.first.set()


def test_term_lets_a_stream_finish_and_exits_zero(make_server):
    srv = make_server(workers=2, config=SLOW_ECHO)
    reader = StreamReader(srv)
    reader.start()
    assert reader.first.wait(10) and reader.error is None, reader.error
    t0 = time.monotonic()
    srv.send_signal(signal.SIGTERM)
    # While draining, the master refuses nothing already accepted, but takes no new work:
    # the listeners close when the master exits.
    reader.join(15)
    assert not reader.is_alive()
    assert reader.error is None, reader.error
    from server import parse_responses
    [(status, headers, body)] = parse_responses(reader.data)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    lines = [json.loads(x) for x in body.decode().strip().split("\n")]
    assert "".join(x["token"] for x in lines if "token" in x) == "a b c d e f"
    assert lines[-1]["done"] is True and lines[-1]["usage"]["completion_tokens"] == 6
    assert reader.closed_after  # the draining worker closed the connection after it
    code = srv.proc.wait(20)
    assert code == 0, srv.log()
    assert time.monotonic() - t0 >= 0.5  # it waited for the stream (5 more tokens, 300 ms apart)
    srv.assert_no_shm()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_quick_stop_signals(make_server, sig):
    srv = make_server(workers=2)
    pids = srv.worker_pids()
    code = srv.stop(sig, timeout=10)
    assert code == 0, srv.log()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_port_taken_fails_fast_naming_the_address(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        p = start_cli(tmp_path, "-b", f"127.0.0.1:{port}", "-w", "1",
                      "--pid-file", str(tmp_path / "p.pid"))
        out, _ = p.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}: address already in use" in out
    assert elapsed < 15  # no retry loop: an interpreter start and one bind attempt
    assert not (tmp_path / "p.pid").exists()
    assert not os.path.exists(f"/dev/shm/{block_name(str(tmp_path / 'p.pid'))}")


def test_port_taken_by_another_reuseport_server(tmp_path):
    # A server that set SO_REUSEPORT itself would let us silently join its group.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = start_cli(tmp_path, "-b", f"127.0.0.1:{port}", "-w", "1",
                      "--pid-file", str(tmp_path / "p.pid"))
        out, _ = p.communicate(timeout=30)
    assert p.returncode != 0 and f"127.0.0.1:{port}" in out and "in use" in out


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this machine")
def test_multiple_binds_ipv4_and_ipv6(make_server):
    p4, p6 = free_port(), free_port("::1")
    srv = make_server(workers=2, bind=f"127.0.0.1:{p4}", extra_args=["-b", f"[::1]:{p6}"])
    assert f"listening on 127.0.0.1:{p4}, [::1]:{p6}" in srv.log()
    for host, port, fam in (("127.0.0.1", p4, socket.AF_INET), ("::1", p6, socket.AF_INET6)):
        with socket.socket(fam) as s:
            s.settimeout(5)
            s.connect((host, port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            from server import read_all
            data = read_all(s)
        assert data.startswith(b"HTTP/1.1 200"), data[:100]


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this machine")
def test_second_bind_taken_releases_the_first(tmp_path):
    p4 = free_port()
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        p6 = taken.getsockname()[1]
        p = start_cli(tmp_path, "-b", f"127.0.0.1:{p4}", "-b", f"[::1]:{p6}", "-w", "1",
                      "--pid-file", str(tmp_path / "p.pid"))
        out, _ = p.communicate(timeout=30)
    assert p.returncode != 0 and f"cannot bind [::1]:{p6}" in out
    with socket.socket() as s:  # the first address was not left bound
        s.bind(("127.0.0.1", p4))


def test_multiple_ipv4_binds_share_the_workers(make_server):
    p1, p2 = free_port(), free_port()
    srv = make_server(workers=2, bind=f"127.0.0.1:{p1}", extra_args=["-b", f"127.0.0.1:{p2}"])
    for port in (p1, p2):
        srv.port = port
        assert srv.request("GET", "/health")[0] == 200


def test_stale_block_from_killed_master_is_replaced(tmp_path):
    first = Server(tmp_path, workers=1)
    second = None
    try:
        first.start()
        for _ in range(50):
            assert first.request("GET", "/health")[0] == 200
        assert first.stats()["requests"] > 50
        workers = first.worker_pids()
        shm = f"/dev/shm/{block_name(first.pid_file)}"
        assert os.path.exists(shm)
        first.proc.kill()  # SIGKILL the master alone: nothing runs its clean-up
        first.proc.wait(10)
        assert os.path.exists(shm), "SIGKILL should leave the block behind"
        # orphaned workers notice the master is gone (getppid) and leave by themselves
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and not _zombie(p)
                                 for p in workers), timeout=15, what="orphaned workers exit")
        t_second = int(time.time())
        second = Server(tmp_path, workers=1)
        second.log_path = tmp_path / "server2.log"
        second.start()
        assert f"stale stats block {block_name(first.pid_file)} left by master pid {first.pid}" \
            in second.log()
        s = second.stats()
        assert s["master"]["pid"] == second.pid
        # a fresh block: only the readiness probes and this request are counted
        assert s["requests"] < 50 and s["master"]["started"] >= t_second
        assert second.stop() == 0
        assert not os.path.exists(shm)
    finally:
        for srv in (first, second):
            if srv is not None:
                srv.kill()
        for p in locals().get("workers", []):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_that_cannot_get_its_socket_is_retried_while_the_others_serve(make_server):
    """TTIN needs a new listening socket per address. With the master out of
    file descriptors (its RLIMIT_NOFILE lowered to its lowest free fd) the
    socket cannot be made: EMFILE. That used to reach the master's last-resort
    handler, which SIGKILLed every worker and exited. Now that worker is tried
    again with a back-off, the others serve on, and it starts once it can."""
    import psutil
    srv = make_server(workers=1)
    [first] = srv.worker_pids()
    master = psutil.Process(srv.pid)
    soft, hard = master.rlimit(psutil.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{srv.pid}/fd")}
    lowest_free = min(set(range(len(used) + 1)) - used)
    master.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, hard))   # the next fd is refused
    try:
        srv.send_signal(signal.SIGTTIN)
        wait_for(lambda: srv.log().count("worker failed at start (cannot bind") >= 3, 20,
                 what="three failed tries")
        tries = [x for x in srv.log().splitlines() if "worker failed at start (cannot bind" in x]
        assert all("Too many open files" in x and x.endswith("(worker 2)") for x in tries), tries
        assert "next try in 0.1 s" in tries[0] and "next try in 0.4 s" in tries[2]  # backing off
        assert srv.proc.poll() is None and srv.worker_pids() == [first]
        assert srv.request("GET", "/health")[0] == 200
    finally:
        master.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    srv.workers = 2
    wait_for(lambda: len(srv.worker_pids()) == 2 and srv.ready_workers() == 2, 30,
             what="the second worker started")
    assert first in srv.worker_pids() and "master failed" not in srv.log()


# ---- the master's bookkeeping, without forking: a Master object with a small
# stats block and a real listener, driven by calling its methods.

@pytest.fixture
def master(tmp_path):
    from neurohttp import config
    from neurohttp.master.arbiter import Master
    from neurohttp.master.sockets import open_listeners
    from neurohttp.stats.block import StatsBlock
    from neurohttp.stats.layout import Geometry
    path = tmp_path / "m.toml"
    path.write_text(f'[server]\nbind = ["127.0.0.1:0"]\nworkers = 1\n'
                    f'pid_file = "{tmp_path / "m.pid"}"\n')
    m = Master(config.load(str(path)))
    m.block = StatsBlock.create(block_name(m.cfg.server.pid_file), Geometry(max_workers=2))
    m.listeners = open_listeners(m.cfg.binds, 1, 16)
    yield m
    m._close_listeners()
    m.block.unlink()


def test_a_reload_failing_half_way_leaves_everything_as_it_was(master, caplog):
    """Any exception while a reload is applied (not only a bad config or a
    taken address) is logged with its cause, and the master keeps its config,
    generation, listeners and workers' target: the running generation serves on."""
    from neurohttp.stats import layout as L
    extra = free_port()
    path = master.cfg.path
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.replace('bind = ["127.0.0.1:0"]', f'bind = ["127.0.0.1:0", "127.0.0.1:{extra}"]')
                .replace("workers = 1", "workers = 2"))
    from neurohttp.master.states import Phase
    master.phase = Phase.SERVING   # generation 1 serves
    before = (master.cfg, master.target, master.generation, list(master.listeners),
              master.phase)

    def boom() -> None:
        raise RuntimeError("boom while publishing")
    master._publish_info = boom
    with caplog.at_level("ERROR", logger="neurohttp"):
        master.reload()
    assert (master.cfg, master.target, master.generation, master.listeners,
            master.phase) == before
    assert master.block.words[L.H_GENERATION] == 1
    [rec] = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert "RuntimeError: boom while publishing" in rec.getMessage() and rec.exc_info
    with socket.socket() as s:  # the address the failed reload bound is free again
        s.bind(("127.0.0.1", extra))


def test_no_free_stats_slot_is_logged_once_and_retried(master, caplog):
    """Every slot held (by draining workers, say): spawning waits, retried each
    loop turn, and says so once, not five times a second."""
    for _ in range(master.block.nslots - 1):
        assert master.block.reserve_slot(9, 1) > 0
    with caplog.at_level("WARNING", logger="neurohttp"):
        for _ in range(20):
            assert master.spawn(1) is None
    assert sum("no free stats slot" in r.getMessage() for r in caplog.records) == 1
    assert master.workers == {}


def test_worker_count_stays_within_the_blocks_room(master, caplog):
    """TTIN and a reload's `workers` stop at the workers the block was sized for
    (it has two slots each, so a reload's new generation always finds room)."""
    assert master._max_workers() == 2
    master.signals = [signal.SIGTTIN] * 3
    with caplog.at_level("INFO", logger="neurohttp"):
        master._handle_signals()
    assert master.target == 2
    assert any("TTIN refused: 3 workers is more than the stats block was sized for"
               in r.getMessage() for r in caplog.records)
    master.overrides = {"server": {"workers": 9}}
    from neurohttp.master.states import Phase
    master.phase = Phase.SERVING   # generation 1 serves
    with caplog.at_level("WARNING", logger="neurohttp"):
        master.reload()
    assert master.target == 2 and master.generation == 2
    assert any("reload: keeping fewer workers: 9 workers" in r.getMessage()
               for r in caplog.records)
