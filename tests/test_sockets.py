"""The kernel mechanisms the no-request-lost guarantees rest on, on real sockets:
steering a SO_REUSEPORT group with classic BPF, refusing new SYNs while the
queue is still served, the accept-queue length, and the group order the
master keeps in step with the kernel's."""

from __future__ import annotations

import socket
import time

import pytest

from neurohttp.master.sockets import BindError, Listener, accept_queue_length, refuse_new


def drain(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            c, _ = sock.accept()
        except BlockingIOError:
            return n
        c.close()
        n += 1


def connect_many(port: int, n: int, host: str = "127.0.0.1") -> list[socket.socket]:
    return [socket.create_connection((host, port), timeout=5) for _ in range(n)]


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not has_ipv6(),
                                                                  reason="no IPv6"))]


def spread(lst: Listener, n: int = 60) -> list[int]:
    """Open n connections; how many landed on each socket of the group."""
    conns = connect_many(lst.port, n, lst.host)
    time.sleep(0.05)
    got = [drain(s) for s in lst.sockets]
    for c in conns:
        c.close()
    return got


@pytest.fixture(params=HOSTS)
def group(request):
    lst = Listener(request.param, 0, 128)
    lst.ensure(3)
    yield lst
    lst.close()


def test_steering_picks_only_the_given_sockets(group):
    assert sum(spread(group)) == 60
    group.steer([0, 2])
    got = spread(group)
    assert got[1] == 0 and got[0] > 0 and got[2] > 0, got
    group.steer([1])
    assert spread(group) == [0, 60, 0]
    group.steer([0, 1, 2])  # back to all three (a program, now: one is attached)
    assert all(n > 0 for n in spread(group, 90))


def ebpf_steering_available() -> bool:
    from neurohttp.master.steering import RoundRobin
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            rr = RoundRobin()
            try:
                rr.attach(s, [0])
            finally:
                rr.close()
        return True
    except OSError:
        return False


needs_ebpf = pytest.mark.skipif(not ebpf_steering_available(),
                                reason="the kernel refuses eBPF reuseport programs here")


@needs_ebpf
def test_round_robin_splits_connections_evenly(group):
    """The eBPF program hands connections out in turn: exact shares, whatever
    the client ports (the kernel's hash gives 60/40 splits over few connections)."""
    group.steer([0, 1, 2])
    assert group.round_robin, "round-robin steering was refused by the kernel"
    assert spread(group, 60) == [20, 20, 20]
    group.steer([0, 2])
    assert spread(group, 60) == [30, 0, 30]
    group.steer([2, 1])
    assert spread(group, 40) == [0, 20, 20]


def test_round_robin_program_falls_back_to_random_steering(group):
    """Where the kernel refuses eBPF, steering still works (classic BPF, random)."""
    group.round_robin = False
    group.steer([0, 2])
    got = spread(group)
    assert got[1] == 0 and got[0] + got[2] == 60, got


def test_accept_queue_length(group):
    group.steer([0])
    conns = connect_many(group.port, 5, group.host)
    time.sleep(0.05)
    assert accept_queue_length(group.sockets[0]) == 5
    assert accept_queue_length(group.sockets[1]) == 0
    assert drain(group.sockets[0]) == 5
    assert accept_queue_length(group.sockets[0]) == 0
    for c in conns:
        c.close()


@pytest.mark.parametrize("host", HOSTS)
def test_refused_socket_keeps_its_queue_and_takes_no_new_connection(host):
    lst = Listener(host, 0, 128)
    try:
        lst.ensure(1)
        queued = connect_many(lst.port, 3, host)
        time.sleep(0.05)
        refuse_new(lst.sockets[0])
        # A new SYN is dropped: connect() does not complete (the client would retry
        # the SYN a second later, and by then the socket is closed: refused).
        late = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        late.setblocking(False)
        assert late.connect_ex((host, lst.port)) in (115, 11)  # EINPROGRESS
        time.sleep(0.3)
        assert late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        with pytest.raises(OSError):
            late.getpeername()  # still not connected
        # the three connections queued before are all still there to accept
        assert drain(lst.sockets[0]) == 3
        late.close()
        for c in queued:
            c.close()
    finally:
        lst.close()


def test_shrink_keeps_positions_and_tracks_holders():
    lst = Listener("127.0.0.1", 0, 128)
    try:
        lst.ensure(3)
        third = lst.sockets[2]
        lst.hold(third, 4242)            # a worker still holds the third socket
        gone = lst.shrink(2)
        assert gone == [third] and third.fileno() == -1  # the master's copy is closed
        assert lst.group[2] is third     # still in the kernel's group: 4242 holds it
        lst.release(4242)                # that worker exited: it left the group
        assert lst.group == lst.sockets
        assert sum(spread(lst)) == 60    # steered to the two that stay
        lst.ensure(3)                    # grows again at the end of the group
        assert lst.group == lst.sockets and len(lst.group) == 3
    finally:
        lst.close()


def test_port_in_use_is_a_bind_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(BindError, match="address already in use"):
            Listener("127.0.0.1", s.getsockname()[1], 128)
