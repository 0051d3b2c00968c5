"""Listening sockets. Each address gets one SO_REUSEPORT socket per worker, all
created and held by the master, so a worker that dies or is replaced never
takes a socket (and the connections queued on it) down with it: its successor
inherits the same socket. New connections are handed to the group's sockets
in turn (steering.py), not by the kernel's 4-tuple hash."""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
from typing import Literal

from .steering import RoundRobin

log = logging.getLogger("neurohttp")


class BindError(Exception):
    pass


# ---- Linux socket filters (classic BPF). Python's socket module has no
# constants for these; the numbers are from <asm-generic/socket.h>.
SO_ATTACH_FILTER = 26
SO_ATTACH_REUSEPORT_CBPF = 51
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_ALU_MOD_K, _ALU_AND_K = 0x94, 0x54
_JEQ_K = 0x15
_RET_K, _RET_A = 0x06, 0x16
_SKF_AD_RANDOM = -0x1000 + 56


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _attach(sock: socket.socket, opt: int, prog: list[tuple[int, int, int, int]]) -> None:
    insns = (_SockFilter * len(prog))(*[_SockFilter(c, jt, jf, k & 0xFFFFFFFF)
                                        for c, jt, jf, k in prog])
    fprog = _SockFprog(len(prog), insns)
    sock.setsockopt(socket.SOL_SOCKET, opt,
                    ctypes.string_at(ctypes.addressof(fprog), ctypes.sizeof(fprog)))


def steer(sock: socket.socket, indices: list[int]) -> None:
    """Send new connections of `sock`'s SO_REUSEPORT group only to the sockets at
    these positions of the group (chosen at random per SYN).

    The kernel otherwise hashes every SYN over all sockets of the group, so a
    socket whose worker is gone or leaving would keep receiving connections.
    """
    prog = [(_LD_W_ABS, 0, 0, _SKF_AD_RANDOM), (_ALU_MOD_K, 0, 0, len(indices))]
    if indices == list(range(len(indices))):
        prog.append((_RET_A, 0, 0, 0))
    else:
        for j, idx in enumerate(indices):
            prog += [(_JEQ_K, 0, 1, j), (_RET_K, 0, 0, idx)]
        prog.append((_RET_K, 0, 0, indices[0]))
    _attach(sock, SO_ATTACH_REUSEPORT_CBPF, prog)


def refuse_new(sock: socket.socket) -> None:
    """Drop the SYNs that reach this listener, but not the handshake ACKs.

    Connections already queued, or half-way through their handshake, still
    reach the accept queue, where the socket's last holder accepts them before
    it closes the socket. A client whose SYN was dropped retries it a second
    later, by when the socket is gone: it is then refused (or, if the group
    has other sockets, served by one of them), never reset after connecting.
    """
    _attach(sock, SO_ATTACH_FILTER, [
        (_LD_B_ABS, 0, 0, 13),          # TCP flags (skb data starts at the TCP header)
        (_ALU_AND_K, 0, 0, 0x12),       # SYN | ACK
        (_JEQ_K, 0, 1, 0x02),           # a bare SYN: a new connection
        (_RET_K, 0, 0, 0),              # drop it
        (_RET_K, 0, 0, 0xFFFFFFFF)])    # keep everything else


def accept_queue_length(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (Linux: for a
    listener, TCP_INFO's tcpi_unacked is the queue length); 0 if unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    return struct.unpack_from("I", info, 24)[0] if len(info) >= 28 else 0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _new_socket(host: str, port: int, reuseport: bool) -> socket.socket:
    fam = _family(host)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6:
            # "[::]:8080" and "0.0.0.0:8080" can then both be bound
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def describe(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listener:
    """One bind address: a group of SO_REUSEPORT sockets on the same port.

    `sockets[i]` is the socket of worker i+1. `group` mirrors the kernel's
    order of the reuseport group, which is what a steering program indexes:
    a socket joins at the end when it starts listening, and when one leaves
    (its last holder closes it) the last socket takes its place. Sockets the
    master has given up stay in `group` while a worker still holds them.
    """

    def __init__(self, host: str, port: int, backlog: int, tls: bool = False) -> None:
        self.host = host
        self.requested_port = port   # 0 stays 0, so a reload matches it to this listener
        self.backlog = backlog
        self.tls = tls               # a server.tls_bind address: workers serve it with TLS
        # Probe without SO_REUSEPORT: this fails if anything listens there, even
        # another server that set SO_REUSEPORT itself (which would let us join it).
        try:
            probe = _new_socket(host, port, reuseport=False)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BindError(f"cannot bind {describe(host, port)}: address already in use") from None
            raise BindError(f"cannot bind {describe(host, port)}: {e.strerror}") from None
        self.port = probe.getsockname()[1]  # resolves port 0 to the chosen port
        probe.close()
        self.sockets: list[socket.socket] = []
        self.group: list[socket.socket] = []
        self.holders: dict[int, set[int]] = {}   # id(socket) -> worker pids holding it
        self.steered: list[int] | None = None     # positions last given to steer()
        self.attached = False                     # a steering program is in the kernel
        # Round-robin steering (steering.py); None: not tried yet, False: refused.
        self.round_robin: RoundRobin | None | Literal[False] = None

    @property
    def address(self) -> str:
        return describe(self.host, self.port)

    @property
    def key(self) -> tuple[str, int, bool]:
        """What a reload matches a config's address to."""
        return self.host, self.requested_port, self.tls

    @property
    def label(self) -> str:
        return f"{self.address} (tls)" if self.tls else self.address

    def ensure(self, count: int) -> None:
        """Have at least `count` sockets in the group."""
        while len(self.sockets) < count:
            try:
                sock = _new_socket(self.host, self.port, reuseport=True)
                sock.listen(self.backlog)
            except OSError as e:
                raise BindError(f"cannot bind {self.address}: {e.strerror}") from None
            sock.setblocking(False)
            self.sockets.append(sock)
            self.group.append(sock)
            self.holders[id(sock)] = set()

    def socket_for(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]

    def hold(self, sock: socket.socket, pid: int) -> None:
        self.holders.setdefault(id(sock), set()).add(pid)

    def release(self, pid: int) -> None:
        """Worker `pid` has exited: sockets nobody holds any more have left the group."""
        for sock in list(self.group):
            held = self.holders.get(id(sock))
            if held is None:
                continue
            held.discard(pid)
            if not held and sock.fileno() < 0:  # the master gave it up already
                self._left(sock)

    def _left(self, sock: socket.socket) -> None:
        i = self.group.index(sock)
        last = self.group.pop()
        if last is not sock:
            self.group[i] = last
        self.holders.pop(id(sock), None)
        self.steered = None  # positions moved: steer again

    def shrink(self, count: int) -> list[socket.socket]:
        """Give up the sockets of workers count+1 and up: steer new connections
        away from them, drop new SYNs on them, close the master's copy. Their
        holders accept what is queued before they close them. Returns them."""
        gone = []
        while len(self.sockets) > max(count, 1):
            gone.append(self.sockets.pop())
        if not gone:
            return gone
        self.steer(list(range(len(self.sockets))))
        for sock in gone:
            try:
                refuse_new(sock)
            except OSError:
                pass
            sock.close()
            if not self.holders.get(id(sock)):
                self._left(sock)
        return gone

    def steer(self, indices: list[int]) -> None:
        """Steer new connections to the sockets of these worker indices."""
        positions = sorted(self.group.index(self.sockets[i]) for i in indices
                           if i < len(self.sockets))
        if not positions or positions == self.steered:
            return
        if self.round_robin is None:
            try:
                self.round_robin = RoundRobin()
            except OSError as e:
                log.info("round-robin steering unavailable (%s): the kernel's hash "
                         "spreads connections", e.strerror)
                self.round_robin = False
        if self.round_robin:
            try:
                self.round_robin.attach(self.sockets[0], positions)
            except OSError as e:
                log.info("round-robin steering refused (%s): the kernel's hash "
                         "spreads connections", e.strerror)
                self.round_robin.close()
                self.round_robin = False
            else:
                self.attached = True
                self.steered = positions
                return
        if positions == list(range(len(self.group))) and not self.attached:
            return  # the kernel's own hash already spreads over exactly these
        steer(self.sockets[0], positions)
        self.attached = True
        self.steered = positions

    def refuse_all(self) -> None:
        """Stopping: no new connection on any socket; queued ones are still served."""
        for sock in self.sockets:
            try:
                refuse_new(sock)
            except OSError:
                pass

    def close_in_child(self, keep: set[int]) -> None:
        """In a new worker: close the copies of every socket but `keep` (fds)
        and of the steering map, which only the master uses."""
        for sock in self.sockets:
            if sock.fileno() not in keep:
                sock.close()
        if isinstance(self.round_robin, RoundRobin):
            self.round_robin.close()

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        if self.round_robin:
            self.round_robin.close()
        self.round_robin = None
        self.sockets = []
        self.group = []
        self.holders = {}


def open_listeners(binds: list[tuple[str, int]], count: int, backlog: int,
                   tls_binds: list[tuple[str, int]] | None = None) -> list[Listener]:
    """Bind every address (all or nothing), `count` sockets each: the plain
    ones, then the TLS ones."""
    listeners: list[Listener] = []
    try:
        for host, port, tls in [(h, p, False) for h, p in binds] + \
                [(h, p, True) for h, p in tls_binds or []]:
            lst = Listener(host, port, backlog, tls)
            listeners.append(lst)
            lst.ensure(count)
    except BaseException:
        for lst in listeners:
            lst.close()
        raise
    return listeners
