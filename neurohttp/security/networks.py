"""Client addresses and sets of networks (CIDRs), for the firewall.

An address is parsed once into (version, integer) with inet_pton (strict:
"1.2.3", "01.2.3.4" or " 1.2.3.4" are not addresses); an IPv4-mapped IPv6 address
(::ffff:a.b.c.d, what a dual-stack listener reports for an IPv4 peer) is the
IPv4 address, and an IPv6 zone ("%eth0") is dropped. A set of networks is
compiled into sorted, merged integer ranges per version, so a lookup is one
bisect whatever the number of CIDRs; the IPv4 part of an IPv6 network that
covers mapped addresses (::ffff:0:0/96 and inside it) is added to the IPv4
ranges, so "::ffff:10.0.0.0/104" and "10.0.0.0/8" mean the same.
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable

_pton = socket.inet_pton
_ntop = socket.inet_ntop
_V4, _V6 = socket.AF_INET, socket.AF_INET6
_MAPPED = 0xFFFF << 32          # ::ffff:0:0, the start of the IPv4-mapped block
_MAPPED_END = _MAPPED + (1 << 32) - 1

Address = tuple[int, int]  # (4 or 6, the address as an integer)


def parse(addr: str) -> Address | None:
    """(4, n) or (6, n) for an address string; None if it is not one."""
    if ":" not in addr:
        try:
            return 4, int.from_bytes(_pton(_V4, addr), "big")
        except OSError:
            return None
    try:
        n = int.from_bytes(_pton(_V6, addr.partition("%")[0]), "big")
    except OSError:
        return None
    if n >> 32 == 0xFFFF:
        return 4, n & 0xFFFFFFFF
    return 6, n


def text(a: Address) -> str:
    """The canonical spelling of a parsed address (IPv4 dotted, IPv6 compressed)."""
    v, n = a
    return _ntop(_V4, n.to_bytes(4, "big")) if v == 4 else _ntop(_V6, n.to_bytes(16, "big"))


def canonical(addr: str) -> str | None:
    """One spelling per address: what per-address limits are keyed by, so that
    "::ffff:10.0.0.1", "0:0:0:0:0:ffff:a00:1" and "10.0.0.1" share one."""
    a = parse(addr)
    if a is None:
        return None
    # inet_pton takes only plain dotted decimal for IPv4: already canonical
    return addr if a[0] == 4 and ":" not in addr else text(a)


def _merge(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for lo, hi in sorted(ranges):
        if ends and lo <= ends[-1] + 1:
            if hi > ends[-1]:
                ends[-1] = hi
        else:
            starts.append(lo)
            ends.append(hi)
    return starts, ends


class Networks:
    """A set of networks, e.g. Networks(["10.0.0.0/8", "2001:db8::/32"])."""

    __slots__ = ("cidrs", "_s4", "_e4", "_s6", "_e6")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.cidrs = list(cidrs)
        r4: list[tuple[int, int]] = []
        r6: list[tuple[int, int]] = []
        for c in self.cidrs:
            net = ipaddress.ip_network(c, strict=False)
            lo = int(net.network_address)
            hi = int(net.broadcast_address)
            if net.version == 4:
                r4.append((lo, hi))
                continue
            r6.append((lo, hi))
            if lo <= _MAPPED_END and hi >= _MAPPED:  # covers IPv4-mapped addresses
                r4.append((max(lo, _MAPPED) - _MAPPED, min(hi, _MAPPED_END) - _MAPPED))
        self._s4, self._e4 = _merge(r4)
        self._s6, self._e6 = _merge(r6)

    def __bool__(self) -> bool:
        return bool(self.cidrs)

    def has(self, a: Address | None) -> bool:
        """Whether a parsed address (None: not an address) is in the set."""
        if a is None:
            return False
        v, n = a
        starts, ends = (self._s4, self._e4) if v == 4 else (self._s6, self._e6)
        i = bisect_right(starts, n) - 1
        return i >= 0 and n <= ends[i]

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, str) and self.has(parse(addr))

    def __repr__(self) -> str:
        return f"Networks({self.cidrs!r})"
