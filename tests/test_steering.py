"""Connection steering follows the workers' heartbeats, against a real server:
a worker whose loop stops (SIGSTOP, a stuck handler) gets no new connections
a second or so later, long before worker_timeout kills it, and gets them again
when it is back. Both steering programs are checked: the eBPF round robin and
the classic-BPF fallback used where the kernel refuses eBPF (forced here by
running the server without CAP_BPF and CAP_SYS_ADMIN)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from load import REQUESTS, one_request
from server import Server, wait_for
from slots import Slots
from test_sockets import ebpf_steering_available

from neurohttp.stats import layout as L

ADDR = "127.0.0.1"
HEALTH = REQUESTS[0]  # GET /health on a fresh connection, Connection: close


def can_refuse_ebpf() -> bool:
    """setpriv can drop the capabilities eBPF needs (root, unprivileged BPF off)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    try:
        with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


class ClassicSteeringServer(Server):
    """The server without CAP_BPF/CAP_SYS_ADMIN: the kernel refuses the eBPF
    program and the master steers with classic BPF."""

    def command(self) -> list[str]:
        drop = "-bpf,-sys_admin"
        return ["setpriv", "--bounding-set", drop, "--inh-caps", drop, *super().command()]


STEERING = [
    pytest.param("ebpf", marks=pytest.mark.skipif(
        not ebpf_steering_available(), reason="the kernel refuses eBPF reuseport programs here")),
    pytest.param("classic", marks=pytest.mark.skipif(
        not can_refuse_ebpf(), reason="cannot run the server without CAP_BPF here")),
]


def requests_by_pid(srv: Server) -> dict[int, int]:
    with Slots(srv) as slots:
        return {s.pid: s.requests for s in slots.read() if s.state == L.STATE_READY}


def settled_counts(srv: Server) -> dict[int, int]:
    """Per-worker request counts once they stop moving (queued connections served)."""
    last: list[dict[int, int]] = [{}]

    def still() -> dict[int, int] | None:
        now = requests_by_pid(srv)
        same = now == last[0]
        last[0] = now
        return now if same else None
    return wait_for(still, 15, interval=0.3, what="request counts to settle")


def all_answered(srv: Server, n: int, timeout: float) -> bool:
    return all(one_request((ADDR, srv.port), HEALTH, timeout=timeout) == "ok" for _ in range(n))


@pytest.mark.parametrize("steering", STEERING)
def test_stopped_worker_gets_no_new_connections(tmp_path, steering):
    kind = Server if steering == "ebpf" else ClassicSteeringServer
    # worker_timeout far away: the stopped worker is not killed during the test
    srv = kind(tmp_path / "srv", workers=2, config={"server": {"worker_timeout": 120}})
    srv.start()
    stopped = 0
    try:
        refused = "round-robin steering unavailable" in srv.log()
        assert refused == (steering == "classic"), srv.log()
        pids = srv.worker_pids()
        assert len(set(requests_by_pid(srv)) & set(pids)) == 2
        stopped, running = pids
        os.kill(stopped, signal.SIGSTOP)
        # Within a few seconds every new connection goes to the running worker:
        # rounds of fresh connections, each answered well within its 3 s.
        wait_for(lambda: all_answered(srv, 10, timeout=3), 30,
                 what="new connections all answered while a worker is stopped")
        before = settled_counts(srv)
        assert all_answered(srv, 40, timeout=10)
        after = requests_by_pid(srv)
        assert after[stopped] == before[stopped]
        assert after[running] - before[running] == 40
        os.kill(stopped, signal.SIGCONT)
        stopped = 0
        # It is back: both workers get new connections again.
        wait_for(lambda: "heartbeat back" in srv.log(), 10, what="worker steered to again")
        before = settled_counts(srv)
        assert all_answered(srv, 60, timeout=10)
        after = requests_by_pid(srv)
        shares = sorted(after[p] - before[p] for p in pids)
        assert sum(shares) == 60
        if steering == "ebpf":
            assert shares == [30, 30], shares  # round robin: exact halves
        else:
            assert shares[0] >= 10, shares     # random per SYN
        assert sorted(srv.worker_pids()) == sorted(pids)  # nobody was killed
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        srv.stop()
        srv.kill()


def test_worker_started_after_steering_holds_no_master_descriptor(make_server):
    """A worker forked after the steering program is attached (a replacement
    after kill -9, one more after TTIN) inherits nothing of the master's but
    its own listening socket: no BPF map, no wakeup pipe, no other worker's
    socket."""
    srv = make_server(workers=2)
    first = srv.worker_pids()
    os.kill(first[0], signal.SIGKILL)
    srv.send_signal(signal.SIGTTIN)
    srv.workers = 3
    late = wait_for(lambda: (lambda p: p if len(p) == 3 and first[0] not in p else None)(
        srv.worker_pids()), 20, what="a replacement and a third worker")
    time.sleep(0.3)
    master = fd_targets(srv.pid)
    new = [p for p in late if p not in first]
    assert len(new) == 2
    allowed = {master[0], master[1], master[2], "/dev/null"}
    for pid in new:
        mine = fd_targets(pid)
        assert "anon_inode:bpf-map" not in mine.values(), (pid, mine)
        shared = (set(mine.values()) & set(master.values())) - allowed
        shared = {t for t in shared if not t.startswith("/dev/shm/neurohttp-")}
        # of the master's descriptors, only this worker's own listening socket
        assert len(shared) == 1 and shared.pop().startswith("socket:"), (pid, mine, master)
    assert srv.request("GET", "/health")[0] == 200


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out
