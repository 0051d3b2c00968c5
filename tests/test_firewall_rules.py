"""The firewall's pure parts (networks, X-Forwarded-For) and its per-IP
connection counts in the shared-memory table, with real processes forked from
the block's creator and one of them killed with SIGKILL holding counts."""

from __future__ import annotations

import gc
import os
import signal
import uuid

import pytest

from neurohttp.security.forwarded import forwarded_for, real_client
from neurohttp.security.networks import Networks, canonical, parse
from neurohttp.shared.table import KeyTable
from neurohttp.stats import layout as L
from neurohttp.stats.block import StatsBlock


# ---------------------------------------------------------------- networks
def test_networks_match_ipv4_ipv6_and_mapped_addresses():
    n = Networks(["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::ffff:172.16.0.0/108"])
    assert "10.1.2.3" in n and "10.255.255.255" in n and "10.0.0.0" in n
    assert "11.0.0.0" not in n and "9.255.255.255" not in n
    assert "192.168.1.7" in n and "192.168.1.8" not in n
    assert "2001:db8::1" in n and "2001:DB8:ffff::1" in n and "2001:db9::1" not in n
    # a dual-stack listener's spelling of an IPv4 peer is that IPv4 address
    assert "::ffff:10.9.8.7" in n and "::ffff:11.0.0.1" not in n
    # an IPv6 network over mapped addresses covers the IPv4 addresses themselves
    assert "172.16.5.5" in n and "172.31.255.255" in n and "172.32.0.0" not in n
    assert "fe80::1%eth0" not in Networks(["2001:db8::/32"])
    assert "fe80::1%eth0" in Networks(["fe80::/10"])
    # not addresses: never in a set (whatever it holds)
    everything = Networks(["0.0.0.0/0", "::/0"])
    for bad in ("", "1.2.3", "01.2.3.4", " 1.2.3.4", "1.2.3.4 ", "localhost", "1.2.3.4/32",
                "::g", "unknown"):
        assert bad not in everything, bad
    assert "0.0.0.0" in everything and "::" in everything
    assert not Networks([]) and "1.2.3.4" not in Networks([])


def test_overlapping_networks_are_merged_into_one_range():
    n = Networks(["10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", "10.0.3.0/24"])
    def v4(a: str) -> int:
        p = parse(a)
        assert p is not None and p[0] == 4
        return p[1]
    assert list(zip(n._s4, n._e4, strict=True)) == [
        (v4("10.0.0.0"), v4("10.0.1.255")), (v4("10.0.3.0"), v4("10.0.3.255"))]
    assert "10.0.1.200" in n and "10.0.2.1" not in n and "10.0.3.9" in n


def test_canonical_spelling_keys_one_address_once():
    assert canonical("10.0.0.1") == "10.0.0.1"
    assert canonical("::ffff:10.0.0.1") == "10.0.0.1"
    assert canonical("0:0:0:0:0:ffff:a00:1") == "10.0.0.1"
    assert canonical("2001:0DB8:0000::0001") == "2001:db8::1"
    assert canonical("01.2.3.4") is None and canonical("") is None


# ---------------------------------------------------------------- X-Forwarded-For
TRUSTED = Networks(["10.0.0.0/8", "2001:db8::/32"])


@pytest.mark.parametrize("xff, client", [
    ("203.0.113.7", "203.0.113.7"),
    # the right-most address that is not a trusted proxy; what is left of it is forgeable
    ("1.1.1.1, 203.0.113.7", "203.0.113.7"),
    ("6.6.6.6, 203.0.113.7, 10.0.0.2", "203.0.113.7"),
    ("203.0.113.7,10.0.0.3,10.0.0.2", "203.0.113.7"),
    # every entry a trusted proxy: the left-most
    ("10.0.0.9, 10.0.0.2", "10.0.0.9"),
    # garbage stops the walk: nothing left of it is believed
    ("203.0.113.9, unknown, 10.0.0.2", "10.0.0.2"),
    ("203.0.113.9, _hidden", None),
    ("", None),
    ("not an address", None),
    # ports and brackets, mapped and IPv6 spellings
    ("203.0.113.7:4711", "203.0.113.7"),
    ("[2001:db9::5]:443", "2001:db9::5"),
    ("[2001:db9::5]", "2001:db9::5"),
    ("[2001:db9::5", None),
    ("[2001:db9::5]x", None),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("2001:db8::1, 2001:db9::7, 2001:db8::2", "2001:db9::7"),
])
def test_real_client_is_the_rightmost_untrusted_address(xff, client):
    assert real_client(xff.encode(), TRUSTED) == client


def test_several_forwarded_fields_are_one_list_in_order():
    raw = [(b"Host", b"x"), (b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2"),
           (b"X-Real-IP", b"3.3.3.3"), (b"x-FORWARDED-for", b"10.0.0.1")]
    joined = forwarded_for(raw)
    assert joined == b"1.1.1.1,2.2.2.2,10.0.0.1"
    assert real_client(joined, TRUSTED) == "2.2.2.2"
    assert forwarded_for([(b"X-Real-IP", b"3.3.3.3"), (b"Forwarded", b"for=4.4.4.4")]) is None


# ---------------------------------------------------------------- connection counts
@pytest.fixture
def table():
    geo = L.Geometry(routes=4, models=2, max_workers=4, named_keys=64, open_keys=1024)
    blk = StatsBlock.create(f"neurohttp-test-{uuid.uuid4().hex[:12]}", geo)
    yield blk.state.open
    gc.collect()
    blk.unlink()


def test_connection_counts_are_per_address_across_slots(table: KeyTable):
    assert [table.conn_open("10.0.0.1", 1, 3) for _ in range(2)] == [1, 1]
    assert table.conn_open("10.0.0.1", 2, 3) == 1
    assert table.conn_open("10.0.0.1", 2, 3) == 0  # the 4th, whichever worker
    assert table.conn_open("10.0.0.1", 1, 3) == 0
    assert table.conn_open("10.0.0.2", 1, 3) == 1  # another address
    assert table.conn_count("10.0.0.1") == 3
    table.conn_close("10.0.0.1", 2)
    assert table.conn_count("10.0.0.1") == 2
    assert table.conn_open("10.0.0.1", 1, 3) == 1
    for _ in range(3):
        table.conn_close("10.0.0.1", 1)
    table.conn_close("10.0.0.2", 1)
    assert table.conn_count("10.0.0.1") == 0 and table.conn_count("10.0.0.2") == 0


def test_entries_back_at_zero_are_reclaimed(table: KeyTable):
    for i in range(600):  # far more addresses than 7/8 of the table, one after another
        ip = f"10.1.{i // 256}.{i % 256}"
        assert table.conn_open(ip, 1, 1) == 1
        table.conn_close(ip, 1)
    assert table.figures()["full"] == 0


def test_fold_drops_a_killed_workers_counts_and_keeps_the_others(table: KeyTable):
    """Two processes forked from the block's creator count connections in slots
    1 and 2; the one in slot 1 is killed with SIGKILL holding them. The fold of
    slot 1 (what the master does when it reaps a worker) releases exactly its
    share, and the totals are right for the survivor's and for new counts."""
    r, w = os.pipe()
    pids = []
    for slot, n in ((1, 2), (2, 1)):
        pid = os.fork()
        if pid == 0:  # a worker: counts n connections from each address, then waits
            try:
                for ip in ("10.0.0.1", "10.0.0.2"):
                    for _ in range(n):
                        assert table.conn_open(ip, slot, 3) == 1
                os.write(w, b"x")
                signal.pause()
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    assert len(os.read(r, 1) + os.read(r, 1)) == 2
    os.close(r)
    assert table.conn_count("10.0.0.1") == 3 and table.conn_count("10.0.0.2") == 3
    assert table.conn_open("10.0.0.1", 3, 3) == 0  # full before the kill
    os.kill(pids[0], signal.SIGKILL)
    os.waitpid(pids[0], 0)
    assert table.conn_count("10.0.0.1") == 3  # nothing frees them by itself ...
    assert table.fold_conns(1) == 4           # ... the fold does: 2 from each address
    assert table.conn_count("10.0.0.1") == 1 and table.conn_count("10.0.0.2") == 1
    assert [table.conn_open("10.0.0.1", 3, 3) for _ in range(3)] == [1, 1, 0]
    assert table.fold_conns(1) == 0  # twice is harmless
    assert table.conn_count("10.0.0.1") == 3
    os.kill(pids[1], signal.SIGKILL)
    os.waitpid(pids[1], 0)
    assert table.fold_conns(2) == 2
    assert table.conn_count("10.0.0.1") == 2 and table.conn_count("10.0.0.2") == 0


def test_fold_repairs_a_total_a_dead_worker_left_half_written(table: KeyTable):
    """A worker killed between its share and the total (inside the lock; the
    next locker recovers the mutex): the fold recomputes totals from the shares."""
    assert table.conn_open("10.0.0.7", 1, 5) == 1
    assert table.conn_open("10.0.0.7", 2, 5) == 1
    table.add("c:10.0.0.7", 3)  # the total off by what a half-done update could leave
    assert table.conn_count("10.0.0.7") == 5
    assert table.fold_conns(2) == 1
    assert table.conn_count("10.0.0.7") == 1  # slot 1's share alone
