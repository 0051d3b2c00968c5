"""Listening sockets. Each address gets one SO_REUSEPORT socket per worker, all
created and held by the master, so a worker that dies or is replaced never
takes a socket (and the connections queued on it) down with it: its successor
inherits the same socket."""

from __future__ import annotations

import errno
import socket


class BindError(Exception):
    pass


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
    """One bind address: a group of SO_REUSEPORT sockets on the same port."""

    def __init__(self, host: str, port: int, backlog: int) -> None:
        self.host = host
        self.backlog = backlog
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

    @property
    def address(self) -> str:
        return describe(self.host, self.port)

    def ensure(self, count: int) -> None:
        """Have at least `count` sockets in the group."""
        while len(self.sockets) < count:
            try:
                sock = _new_socket(self.host, self.port, reuseport=True)
            except OSError as e:
                raise BindError(f"cannot bind {self.address}: {e.strerror}") from None
            sock.listen(self.backlog)
            sock.setblocking(False)
            self.sockets.append(sock)

    def socket_for(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []


def open_listeners(binds: list[tuple[str, int]], count: int, backlog: int) -> list[Listener]:
    """Bind every address (all or nothing), `count` sockets each."""
    listeners: list[Listener] = []
    try:
        for host, port in binds:
            lst = Listener(host, port, backlog)
            listeners.append(lst)
            lst.ensure(count)
    except BaseException:
        for lst in listeners:
            lst.close()
        raise
    return listeners
