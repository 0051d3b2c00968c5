"""A rate limiter, exact across every worker (and every server sharing Redis).

    [plugins]
    enabled = ["limiter"]

    [plugins.limiter]
    rpm = 60                  # requests per minute per key (a token bucket refilled continuously)
    burst = 0                 # bucket size; 0: rpm (a minute's worth may come at once)
    key = "ip"                # "ip", "header:<name>" (e.g. "header:x-tenant"), "api_key", "route"
    allow = []                # keys never limited: addresses or CIDRs for "ip", values otherwise
    exclude = ["/health", "/stats", "/metrics", "/dashboard"]  # path prefixes never limited
    [plugins.limiter.routes]  # per-route overrides: a path, or a prefix ending in "*"
    "/v1/chat/completions" = { rpm = 20, burst = 5 }

Over the limit: 429 in OpenAI's error shape on /v1/* (HTML or JSON elsewhere,
like every error), with Retry-After and OpenAI's x-ratelimit-limit-requests,
x-ratelimit-remaining-requests and x-ratelimit-reset-requests. A request whose
key is missing (no such header, no API key) is keyed by its client address,
so leaving the header out never escapes the limit. A route with an override
has its own bucket per key; the others share the default one.

Written on the public plugin API only (neurohttp.plugins): the buckets are
`app.rate` (GCRA in the shared-memory block, or Redis with [state] backend =
"redis"), the refusals `app.metric("refused")`.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from neurohttp.plugins import Admission, OptionError, error_response

EXCLUDE = ["/health", "/stats", "/metrics", "/dashboard"]  # monitoring is never limited
OPTIONS = {"rpm": int, "burst": int, "key": str, "allow": list, "exclude": list,
           "routes": dict}


def validate(options: dict[str, Any]) -> None:
    for where, table in [("", options)] + [(f"routes.{r}.", t) for r, t in
                                           options.get("routes", {}).items()]:
        if not isinstance(table, dict):
            raise OptionError(where.rstrip("."), "must be a table with rpm (and burst)")
        for k in table:
            if where and k not in ("rpm", "burst"):
                raise OptionError(f"{where}{k}", "unknown option (known: burst, rpm)")
        rpm = table.get("rpm", 60)
        if type(rpm) is not int or rpm < 1:
            raise OptionError(f"{where}rpm", f"must be an integer of at least 1, not {rpm!r}")
        burst = table.get("burst", 0)
        if type(burst) is not int or burst < 0:
            raise OptionError(f"{where}burst", f"must be an integer of at least 0, not {burst!r}")
    key = options.get("key", "ip")
    if key not in ("ip", "api_key", "route") and not (key.startswith("header:") and key[7:]):
        raise OptionError("key", f"must be \"ip\", \"header:<name>\", \"api_key\" or \"route\", "
                                 f"not {key!r}")
    for a in options.get("allow", []):
        if not isinstance(a, str):
            raise OptionError("allow", f"must be a list of strings, not one holding {a!r}")
        if key == "ip":
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise OptionError("allow", f"{a!r} is not an address or CIDR") from None
    for p in options.get("exclude", []):
        if not isinstance(p, str) or not p.startswith("/"):
            raise OptionError("exclude", f"must be a list of path prefixes, not one holding {p!r}")


class Limits:
    """One bucket: its rate, and the header values that go with it, made once."""

    __slots__ = ("rate", "admit", "rpm", "burst", "limit_text", "tag")

    def __init__(self, app: Any, name: str, rpm: int, burst: int, tag: str) -> None:
        self.rpm = rpm
        self.burst = burst or rpm
        self.rate = app.rate(name, per_minute=rpm, burst=self.burst)
        self.admit = self.rate.admit
        self.limit_text = str(rpm)
        self.tag = tag  # prefixed to the key: a route's own bucket per key


class Limiter:
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.default = Limits(app, "default", options.get("rpm", 60), options.get("burst", 0), "")
        self.exact: dict[str, Limits] = {}
        self.prefixes: list[tuple[str, Limits]] = []
        for i, (route, table) in enumerate(options.get("routes", {}).items()):
            lim = Limits(app, f"route{i}", table.get("rpm", 60), table.get("burst", 0),
                         f"{i}|")
            if route.endswith("*"):
                self.prefixes.append((route[:-1], lim))
            else:
                self.exact[route] = lim
        self.prefixes.sort(key=lambda p: -len(p[0]))  # the longest prefix wins
        self.exclude = tuple(options.get("exclude", EXCLUDE))
        # the same prefixes as bytes, checked on the raw target (a %-escaped
        # target is checked again on its decoded path below, when by_route)
        self.exclude_raw = tuple(p.encode() for p in self.exclude if p.isascii())
        self.by_route = bool(self.exact or self.prefixes)
        key = options.get("key", "ip")
        self.header = key[7:].lower() if key.startswith("header:") else None
        self.key = "header" if self.header else key
        allow = options.get("allow", [])
        self.allow_values = frozenset(allow) if self.key != "ip" else frozenset()
        self.allow_nets = [ipaddress.ip_network(a, strict=False) for a in allow] \
            if self.key == "ip" else []
        self._allowed_ip: dict[str, bool] = {}
        self.refused = app.metric("refused", help="Requests refused 429 by the limiter.")
        self.async_state = app.state_backend != "shm"

    # ------------------------------------------------------------ the hook
    def __call__(self, request: Any) -> Any:
        # the raw target first: the common request is limited without decoding its path
        if request.target.startswith(self.exclude_raw):
            return None
        if self.by_route:
            path = request.path
            if path.startswith(self.exclude):
                return None
            lim = self.exact.get(path)
            if lim is None:
                lim = self.default
                for prefix, pl in self.prefixes:
                    if path.startswith(prefix):
                        lim = pl
                        break
        else:
            lim = self.default
        if self.key == "ip" and not self.allow_nets:
            key = request.client  # the common case, inline
        else:
            key = self._key(request)
            if key is None:
                return None
        verdict = lim.admit(lim.tag + key if lim.tag else key)
        if self.async_state:
            return self._later(request, lim, verdict)
        if verdict[0]:
            return None
        return self._refuse(request, lim, verdict)

    async def _later(self, request: Any, lim: Limits, pending: Any) -> Any:
        verdict = await pending
        return None if verdict[0] else self._refuse(request, lim, verdict)

    def _key(self, request: Any) -> str | None:
        """The request's key (None: on the allow list)."""
        k = self.key
        if k == "ip":
            ip = request.client
            if self.allow_nets and self._ip_allowed(ip):
                return None
            return ip
        if k == "header":
            v = request.headers.get(self.header)
        elif k == "api_key":
            v = request.key.name if request.key is not None else None
        else:
            v = request.path
        if v is None:
            return "ip:" + request.client  # no value: the client's address is its key
        if v in self.allow_values:
            return None
        return "=" + v

    def _ip_allowed(self, ip: str) -> bool:
        ok = self._allowed_ip.get(ip)
        if ok is None:
            try:
                addr = ipaddress.ip_address(ip.partition("%")[0])
            except ValueError:
                ok = False
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                ok = any(addr.version == n.version and addr in n for n in self.allow_nets)
            if len(self._allowed_ip) > 4096:
                self._allowed_ip.clear()
            self._allowed_ip[ip] = ok
        return ok

    def _refuse(self, request: Any, lim: Limits, v: Admission) -> Any:
        self.refused.add(1)
        wait = v.retry_after
        retry = "86400" if math.isinf(wait) else str(max(1, math.ceil(wait)))
        reset = f"{v.reset:.3f}".rstrip("0").rstrip(".") + "s"
        return error_response(
            request, 429, f"Rate limit reached for requests: limit {lim.rpm} per minute "
            f"(burst {lim.burst}); try again in {retry}s.", code="rate_limit_exceeded",
            headers={"Retry-After": retry, "x-ratelimit-limit-requests": lim.limit_text,
                     "x-ratelimit-remaining-requests": str(v.remaining),
                     "x-ratelimit-reset-requests": reset})


def setup(app: Any, options: dict[str, Any]) -> None:
    app.before_request(Limiter(app, options))
