"""The firewall ([firewall], docs/SECURITY.md "Firewall").

At accept, before a byte is read (the connection calls `on_accept` with the
peer's address and `on_close` when it ends):

    peer a trusted proxy?          yes -> accepted (its requests are screened one by one)
    peer in deny?                  yes -> 403, closed               rule "deny"
    allow set and peer not in it?  yes -> 403, closed               rule "allow"
    max_connections_per_ip held?   yes -> 429 (Retry-After), closed rule "conn_per_ip"

Per request, in the admission step (security/gate.py calls `check` first):

    peer a trusted proxy: the client is X-Forwarded-For's (forwarded.py),
      req.client becomes it, and deny/allow apply to it  -> 403 "deny"/"allow"
    path starts with a deny_paths prefix                  -> 403 "path"
    User-Agent contains a deny_user_agents substring      -> 403 "ua"
    the client over rps_per_ip                            -> 429 "rps_per_ip"

Per-client limits are exact across the workers: connections are counted in
the shared-memory open-key table per (client, worker slot), so the master can
drop a dead worker's share (KeyTable.conn_open / fold_conns); request rates
are a GCRA bucket per client in the same table (burst = rps_per_ip). Each
refusal adds to an exact counter per rule (`figures`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import error_response
from ..messages import Request, Response
from .forwarded import forwarded_for, real_client
from .gate import duration
from .networks import Networks, canonical, parse

RULES = ("allow", "deny", "conn_per_ip", "ua", "path", "rps_per_ip")
COUNTER = "fw:"  # + rule: exact counters in the named table
_CACHE_BOUND = 4096  # entries per memo (paths, user agents, peers): a bound, not a policy

_UA = b"user-agent"

_FORBIDDEN = {
    "allow": "your address is not allowed to use this server",
    "deny": "your address is not allowed to use this server",
    "path": "this path is not served",
    "ua": "requests from this client are not allowed",
}


def refused_at_accept(status: int) -> Response:
    """The answer of a connection refused at accept (no request read: an HTML page)."""
    if status == 403:
        return error_response(None, 403, _FORBIDDEN["deny"])
    return error_response(None, 429, "too many connections from your address; close some "
                          "and try again", headers={"Retry-After": "1"})


def figures(read: Callable[[str], int]) -> dict[str, Any]:
    """/stats "firewall": requests and connections refused, per rule."""
    return {"refused": {r: read(COUNTER + r) for r in RULES}}


class Firewall:
    """One worker's firewall: the rules of its generation's config, and the
    shared tables (`state`: the block's SharedState) it counts in."""

    __slots__ = ("allow", "deny", "screens", "proxies", "proxied", "max_conns", "rps",
                 "rps_text", "agents", "paths", "open", "count", "slot", "at_accept",
                 "at_request", "held", "_paths", "_agents", "_proxy")

    def __init__(self, fw: Any, state: Any, slot: int) -> None:
        self.allow = Networks(fw.allow)
        self.deny = Networks(fw.deny)
        self.screens = bool(self.allow or self.deny)
        self.proxies = Networks(fw.trusted_proxies)
        self.proxied = bool(self.proxies)  # (a plain attribute: no __bool__ call per request)
        self.max_conns: int = fw.max_connections_per_ip
        self.rps: int = fw.rps_per_ip
        self.rps_text = str(self.rps)
        self.agents = tuple(a.lower().encode("utf-8") for a in fw.deny_user_agents)
        self.paths = tuple(fw.deny_paths)
        self.open = state.open
        self.count: Callable[[str], Any] = state.named.add
        self.slot = slot
        # what each part needs: the connection's hooks, the admission's check
        self.at_accept = self.screens or self.max_conns > 0
        self.at_request = bool(self.proxies or self.agents or self.paths or self.rps)
        self.held: dict[Any, str] = {}  # connection (its transport) -> the address counted
        self._paths: dict[bytes, bool] = {}
        self._agents: dict[bytes, bool] = {}
        self._proxy: dict[str, bool] = {}

    @property
    def active(self) -> bool:
        return self.at_accept or self.at_request

    # ------------------------------------------------------------ connections
    def on_accept(self, peer: str, conn: Any) -> Response | None:
        """A connection from `peer` was accepted: None to serve it, or the
        answer to write before closing it. `conn` identifies it for on_close."""
        a = parse(peer)
        if self.proxies.has(a):
            return None  # screened per request, by the address it forwards
        if self.screens:
            rule = self._screen(a)
            if rule is not None:
                self.count(COUNTER + rule)
                return refused_at_accept(403)
        if self.max_conns and a is not None:
            ip = canonical(peer) or peer
            r = self.open.conn_open(ip, self.slot, self.max_conns)
            if r != 1:
                if r == 0:
                    self.count(COUNTER + "conn_per_ip")
                # -1: the table is full (counted there): refused too, the strict side
                return refused_at_accept(429)
            self.held[conn] = ip
        return None

    def on_close(self, conn: Any) -> None:
        """The connection ended: release what on_accept counted for it."""
        ip = self.held.pop(conn, None)
        if ip is not None:
            self.open.conn_close(ip, self.slot)

    def _screen(self, a: Any) -> str | None:
        """The rule that refuses a parsed address (None: not an address), or None."""
        if self.deny.has(a):
            return "deny"
        if self.allow and not self.allow.has(a):
            return "allow"
        return None

    # ------------------------------------------------------------ requests
    def check(self, req: Request) -> Response | None:
        """Screen one request: None to admit it, or the refusal. Sets
        req.client to the forwarded client's address behind a trusted proxy."""
        if self.proxied:
            peer = req.client
            trusted = self._proxy.get(peer)
            if trusted is None:
                trusted = self.proxies.has(parse(peer))
                if len(self._proxy) >= _CACHE_BOUND:
                    self._proxy.clear()
                self._proxy[peer] = trusted
            if trusted:
                xff = forwarded_for(req.raw_headers)
                if xff is not None:
                    client = real_client(xff, self.proxies)
                    if client is not None:
                        req.client = client
                if self.screens:  # the proxy was let through at accept: screen the client
                    rule = self._screen(parse(req.client))
                    if rule is not None:
                        return self._forbid(req, rule)
        if self.paths:
            bad = self._paths.get(req.target)
            if bad is None:
                bad = req.path.startswith(self.paths)  # the decoded path the router sees
                if len(self._paths) >= _CACHE_BOUND:
                    self._paths.clear()
                self._paths[req.target] = bad
            if bad:
                return self._forbid(req, "path")
        agents = self.agents
        if agents:
            for name, value in req.raw_headers:
                # the length first: it rules out most fields without hashing their names
                if len(name) == 10 and (name == b"User-Agent" or name.lower() == _UA):
                    bad = self._agents.get(value)
                    if bad is None:
                        low = value.lower()
                        bad = any(a in low for a in agents)
                        if len(self._agents) >= _CACHE_BOUND:
                            self._agents.clear()
                        self._agents[value] = bad
                    if bad:
                        return self._forbid(req, "ua")
        if self.rps:
            client = req.client
            if ":" in client:
                client = canonical(client) or client
            adm = self.open.admit("r:" + client, 1, self.rps, self.rps)
            if not adm.allowed:
                return self._too_many(req, adm)
        return None

    def _forbid(self, req: Request, rule: str) -> Response:
        self.count(COUNTER + rule)
        return error_response(req, 403, _FORBIDDEN[rule], code="forbidden")

    def _too_many(self, req: Request, adm: Any) -> Response:
        self.count(COUNTER + "rps_per_ip")
        wait = adm.retry_after if adm.retry_after != math.inf else 1.0
        return error_response(
            req, 429, f"Rate limit reached for your address: {self.rps} requests per "
            f"second. Please try again in {duration(wait)}.", type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait))),
                     "x-ratelimit-limit-requests": self.rps_text,
                     "x-ratelimit-remaining-requests": "0",
                     "x-ratelimit-reset-requests": duration(adm.reset)})
