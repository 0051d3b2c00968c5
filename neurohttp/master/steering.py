"""Round-robin connection steering for a SO_REUSEPORT group, in eBPF.

The kernel spreads new connections over a reuseport group by a hash of the
4-tuple. Over a few long-lived connections (wrk's 64, or a load balancer's
keep-alive pool) that is lopsided: 60/40 splits between two workers are
common, and the busier worker sets the tail latency. This program hands new
connections to the group's sockets in turn from a counter in a one-entry BPF
array map (an atomic fetch-and-add per SYN), so the split is even whatever
the clients' ports.

Python has no bpf() wrapper, so the two calls we need (map create, program
load) go through libc's syscall(). Where the kernel refuses (no CAP_BPF, an
old kernel), `RoundRobin.attach` raises OSError and the caller keeps the
classic-BPF steering in sockets.py.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import struct

SO_ATTACH_REUSEPORT_EBPF = 52
_BPF_MAP_CREATE, _BPF_PROG_LOAD = 0, 5
_BPF_MAP_TYPE_ARRAY = 2
_BPF_PROG_TYPE_SOCKET_FILTER = 1
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}.get(platform.machine())

_libc = ctypes.CDLL(None, use_errno=True)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _bpf(cmd: int, attr: bytes) -> int:
    if _SYS_BPF is None:
        raise OSError(95, f"bpf() is not wired for {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, 128)
    fd: int = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def program(map_fd: int, positions: list[int]) -> bytes:
    """The instructions: r0 = positions[fetch_add(counter, 1) % len(positions)]."""
    n = len(positions)
    pick = []
    if positions != list(range(n)):
        for j, p in enumerate(positions):
            pick += [_insn(0x55, dst=0, off=2, imm=j),     # if r0 != j: skip 2
                     _insn(0xB7, dst=0, imm=p),            # r0 = positions[j]
                     _insn(0x95)]                          # exit
        pick += [_insn(0xB7, dst=0, imm=positions[0])]
    pick += [_insn(0x95)]                                  # exit (r0 is the index)
    body = [
        _insn(0xBC, dst=0, src=1),                         # w0 = w1 (the old counter)
        _insn(0x94, dst=0, imm=n),                         # w0 %= n
        *pick,
    ]
    fail = [_insn(0xB7, dst=0, imm=positions[0]), _insn(0x95)]  # no map value: first socket
    head = [
        _insn(0xB7, dst=1, imm=0),                         # r1 = 0
        _insn(0x63, dst=10, src=1, off=-4),                # *(u32 *)(r10 - 4) = r1: the key
        _insn(0xBF, dst=2, src=10),                        # r2 = r10
        _insn(0x07, dst=2, imm=-4),                        # r2 -= 4
        _insn(0x18, dst=1, src=1, imm=map_fd),             # r1 = the map (ld_imm64, pseudo fd)
        _insn(0x00),
        _insn(0x85, imm=1),                                # call bpf_map_lookup_elem
        _insn(0x15, dst=0, off=2 + len(body), imm=0),      # if r0 == NULL: goto fail
        _insn(0xB7, dst=1, imm=1),                         # r1 = 1
        _insn(0xC3, dst=0, src=1, imm=0x01),               # w1 = atomic_fetch_add(*(u32 *)r0, w1)
    ]
    return b"".join(head + body + fail)


class RoundRobin:
    """One counter map per listening address; programs come and go with the group."""

    def __init__(self) -> None:
        attr = struct.pack("<IIIII", _BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
        self.map_fd = _bpf(_BPF_MAP_CREATE, attr)

    def attach(self, sock: socket.socket, positions: list[int]) -> None:
        """Steer the group of `sock` round robin over these group positions."""
        insns = program(self.map_fd, positions)
        code = ctypes.create_string_buffer(insns, len(insns))
        license = ctypes.create_string_buffer(b"MIT")
        log = ctypes.create_string_buffer(65536)

        def load(log_level: int) -> int:
            attr = struct.pack("<IIQQIIQ", _BPF_PROG_TYPE_SOCKET_FILTER, len(insns) // 8,
                               ctypes.addressof(code), ctypes.addressof(license),
                               log_level, len(log) if log_level else 0,
                               ctypes.addressof(log) if log_level else 0)
            return _bpf(_BPF_PROG_LOAD, attr)

        try:
            prog_fd = load(0)
        except OSError as e:
            try:  # again with the verifier's log, to say why
                load(1)
            except OSError:
                pass
            detail = log.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OSError(e.errno, f"{e.strerror} {detail[0]}".strip()) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF,
                            struct.pack("i", prog_fd))
        finally:
            os.close(prog_fd)  # the group keeps its own reference

    def close(self) -> None:
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1
