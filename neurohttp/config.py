"""Configuration: a TOML file checked against a schema, every key optional.

The schema below is the single source of truth for keys, types, defaults and
checks; `conf/neurohttp.toml` documents the same keys (a test keeps the two in
step). Errors name the file and the dotted key, like nginx -t does.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, cast


class ConfigError(Exception):
    """A config that cannot be used; the message names the file and the key."""


NUM = (int, float)
MiB, GiB = 1 << 20, 1 << 30
HOUR, DAY = 3600, 86400
# Numbers without a range of their own (a key someone adds) must still be finite
# and within this; every key below has its own.
DEFAULT_RANGE: tuple[float, float] = (0, 10**9)


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None
    # Numbers: inclusive bounds. Every number must also be finite (TOML has inf
    # and nan): an infinite timeout crashed the master's arithmetic on reload.
    range: tuple[float, float] | None = None

    @property
    def numeric(self) -> bool:
        return self.type in (int, float, NUM)

    @property
    def bounds(self) -> tuple[float, float]:
        return self.range or DEFAULT_RANGE


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


def parse_bind(addr: str) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080', ':8080' or '8080' -> (host, port)."""
    addr = addr.strip()
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {addr!r}: expected [IPv6]:PORT")
    elif addr.count(":") == 1:
        host, _, port = addr.partition(":")
    elif addr.isdigit():
        host, port = "", addr
    else:
        raise ValueError(f"bad address {addr!r}: expected HOST:PORT")
    host = host or "0.0.0.0"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"bad address {addr!r}: host must be an IP address") from None
    else:
        host = "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {addr!r}: port must be 0-65535")
    return host, int(port)


def _bind_list(v: Any) -> str | None:
    # [] is allowed here: a server may listen with TLS only (tls_bind); from_dict
    # checks that bind and tls_bind together name at least one address.
    for a in v:
        if not isinstance(a, str):
            return "must be a list of 'HOST:PORT' strings"
        try:
            parse_bind(a)
        except ValueError as e:
            return str(e)
    return None


def _cidr_list(v: Any) -> str | None:
    for a in v:
        try:
            ipaddress.ip_network(a, strict=False)
        except (TypeError, ValueError):
            return f"{a!r} is not an IP network"
    return None


def _str_list(v: Any) -> str | None:
    return None if all(isinstance(x, str) and x for x in v) else "must be a list of names"


def _substrings(v: Any) -> str | None:
    return None if all(isinstance(x, str) and x for x in v) else "must be a list of non-empty strings"


def _path_prefixes(v: Any) -> str | None:
    if all(isinstance(x, str) and x.startswith("/") for x in v):
        return None
    return "must be a list of path prefixes starting with '/'"


def _redis_url(v: Any) -> str | None:
    if v.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "must be a redis://, rediss:// or unix:// URL"


KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "bind": Key(list, ["127.0.0.1:8080"], _bind_list),
        # addresses served with TLS ([tls]), beside the plain ones of `bind`
        "tls_bind": Key(list, [], _bind_list),
        "workers": Key(int, 0, _non_negative, range=(0, 1024)),
        "backlog": Key(int, 2048, _positive, range=(1, 65535)),
        "max_connections": Key(int, 10000, _positive, range=(1, 1_000_000)),
        "max_header_bytes": Key(int, 16384, _positive, range=(1, MiB)),
        "max_body_bytes": Key(int, 8 * 1024 * 1024, _non_negative, range=(0, GiB)),
        # the body limit of routes that stream their body (a plugin's stream_body=True)
        "max_upload_bytes": Key(int, GiB, _positive, range=(1, 1024 * GiB)),
        "header_timeout": Key(NUM, 10.0, _positive, range=(0, HOUR)),
        "body_timeout": Key(NUM, 30.0, _positive, range=(0, HOUR)),
        "keepalive_timeout": Key(NUM, 5.0, _non_negative, range=(0, HOUR)),
        "send_timeout": Key(NUM, 60.0, _positive, range=(0, HOUR)),
        "request_timeout": Key(NUM, 600.0, _positive, range=(1, DAY)),
        "graceful_timeout": Key(NUM, 30.0, _non_negative, range=(0, HOUR)),
        "worker_timeout": Key(NUM, 30.0, _positive, range=(1, HOUR)),
        "max_requests": Key(int, 0, _non_negative, range=(0, 10**9)),
        "max_requests_jitter": Key(int, 0, _non_negative, range=(0, 10**9)),
        "max_worker_rss_mb": Key(int, 0, _non_negative, range=(0, MiB)),
        "max_pipeline": Key(int, 32, _positive, range=(1, 1024)),
        "write_buffer_bytes": Key(int, 256 * 1024, _positive, range=(1, 64 * MiB)),
        "sse_ping_s": Key(NUM, 15.0, _non_negative, range=(0, HOUR)),
        "ws_ping_s": Key(NUM, 20.0, _non_negative, range=(0, HOUR)),
        "ws_idle_timeout": Key(NUM, 300.0, _non_negative, range=(0, DAY)),
        "pid_file": Key(str, "neurohttpd.pid"),
        "loop": Key(str, "auto", _one_of("auto", "uvloop", "asyncio")),
    },
    "log": {
        "level": Key(str, "info", _one_of("debug", "info", "warning", "error")),
        "error_log": Key(str, "-"),
        "access_log": Key(str, ""),
    },
    "stats": {
        "allow": Key(list, [], _cidr_list),
        # the shared-memory block's room, fixed at start (0: computed; stats/sizing.py)
        "max_workers": Key(int, 0, _non_negative, range=(0, 1024)),
        "max_routes": Key(int, 0, _non_negative, range=(0, 4096)),
        "max_models": Key(int, 0, _non_negative, range=(0, 4096)),
        "max_deployments": Key(int, 0, _non_negative, range=(0, 65536)),
    },
    # Besides these keys, [[auth.keys]] tables (AUTH_KEY_KEYS) hold the API keys.
    "auth": {
        "enabled": Key(bool, False),
        "protect": Key(list, ["/v1/"], _path_prefixes),
        "open": Key(list, ["/health"], _path_prefixes),
    },
    "state": {
        "max_keys": Key(int, 16384, _positive, range=(16, 16_777_216)),
        "backend": Key(str, "shm", _one_of("shm", "redis")),
        "url": Key(str, "redis://127.0.0.1:6379/0", _redis_url),
        "on_redis_error": Key(str, "fail_open", _one_of("fail_open", "fail_closed")),
        "timeout_ms": Key(int, 50, _positive, range=(1, 60_000)),
    },
    # Besides these keys, [plugins.<name>] tables hold each plugin's options.
    "plugins": {
        "paths": Key(list, ["plugins"], _str_list),
        "enabled": Key(list, [], _str_list),
        # seconds a worker's plugins may take to load (setup() and on_startup hooks)
        "setup_timeout": Key(NUM, 60.0, _positive, range=(1, HOUR)),
        # shared counters and figures the plugins may declare (app.counter, app.metric)
        "max_state_keys": Key(int, 1024, _positive, range=(16, 1_048_576)),
    },
    # The firewall (security/firewall.py, docs/SECURITY.md "Firewall"): address
    # rules at accept, per-client limits exact across workers, request rules.
    "firewall": {
        "allow": Key(list, [], _cidr_list),
        "deny": Key(list, [], _cidr_list),
        "max_connections_per_ip": Key(int, 0, _non_negative, range=(0, 1_000_000)),
        "rps_per_ip": Key(int, 0, _non_negative, range=(0, 1_000_000)),
        "deny_user_agents": Key(list, [], _substrings),
        "deny_paths": Key(list, [], _path_prefixes),
        "trusted_proxies": Key(list, [], _cidr_list),
    },
    # The response cache (ai/cache.py, docs/CACHE.md): per worker, used by the
    # models that set cache_ttl_s; evicts least recently used past either bound.
    "cache": {
        "max_entries": Key(int, 1024, _positive, range=(1, 10_000_000)),
        "max_bytes": Key(int, 16 * MiB, _positive, range=(1024, 64 * GiB)),
    },
    # Used by the server.tls_bind listeners; the files are read and checked by
    # tlsconfig.py (neurohttpd check, start, reload).
    "tls": {
        "cert_file": Key(str, ""),
        "key_file": Key(str, ""),
        "ca_file": Key(str, ""),
    },
}


def _key_name(v: Any) -> str | None:
    if KEY_NAME_RE.fullmatch(v):
        return None
    return "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def _sha256_hex(v: Any) -> str | None:
    if re.fullmatch(r"[0-9a-f]{64}", v):
        return None
    return "must be the 64 lowercase hex digits of the key's SHA-256 (neurohttpd keys hash)"


# The keys of each [[auth.keys]] table; name and sha256 are required.
AUTH_KEY_KEYS: dict[str, Key] = {
    "name": Key(str, "", _key_name),
    "sha256": Key(str, "", _sha256_hex),
    "rpm": Key(int, 0, _non_negative, range=(0, 10**9)),
    "tpm": Key(int, 0, _non_negative, range=(0, 10**12)),
    "daily_tokens": Key(int, 0, _non_negative, range=(0, 10**15)),
    "models": Key(list, [], _str_list),
}


# The ceiling on a request's max_tokens, a key of every model table whatever
# its provider (a request above it is a 400).
MAX_OUTPUT_TOKENS = Key(int, 4096, range=(1, 1_000_000_000))
# The response cache, per model whatever its provider (docs/CACHE.md): seconds
# an answer is kept (0: no cache), and whether answers sampled at a temperature
# above 0 (or with none given) may be kept too.
CACHE_TTL_S = Key(NUM, 0, _non_negative, range=(0, 7 * DAY))
CACHE_NONDETERMINISTIC = Key(bool, False)
CACHE_KEYS = {"cache_ttl_s": CACHE_TTL_S, "cache_nondeterministic": CACHE_NONDETERMINISTIC}

# Keys every [models.<name>] table may have, by provider.
MODEL_KEYS: dict[str, dict[str, Key]] = {
    "echo": {
        "provider": Key(str, "echo"),
        "max_output_tokens": MAX_OUTPUT_TOKENS,
        **CACHE_KEYS,
        "token_delay_ms": Key(NUM, 0, _non_negative, range=(0, 60_000)),
        "response": Key(str, ""),
        "repeat": Key(bool, False),
        "split": Key(str, "word", _one_of("word", "token")),
    },
}

# An OpenAI-compatible upstream (the `openai` provider, neurohttp/gateway/,
# docs/ROUTING.md): a model's own keys (how its deployments are chosen), then
# the keys of one deployment. A model with one deployment may put those in its
# own table; several go in [[models.<name>.deployments]] tables.
STRATEGIES = ("round_robin", "weighted", "least_outstanding", "lowest_latency")
ROUTER_KEYS: dict[str, Key] = {
    "provider": Key(str, "openai"),
    "max_output_tokens": MAX_OUTPUT_TOKENS,
    "strategy": Key(str, "round_robin", _one_of(*STRATEGIES)),
    "fallbacks": Key(list, [], _str_list),
    "hedge_after_ms": Key(int, 0, _non_negative, range=(0, 600_000)),
    "retries": Key(int, 0, _non_negative, range=(0, 16)),
    # retries and hedges per request over the last 10 s, across workers (gateway/budget.py)
    "retry_budget": Key(NUM, 0.2, _positive, range=(0, 100)),
    **CACHE_KEYS,
}


def _upstream_url(v: Any) -> str | None:
    from .upstream.origin import split_url  # (a leaf module: no import cycle)
    try:
        split_url(v)
    except ValueError as e:
        return str(e)
    return None


def _headers_table(v: Any) -> str | None:
    from .upstream.h1_client import HeaderBlock
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        return "must be a table of header names to string values"
    try:
        HeaderBlock(v)
    except ValueError as e:
        return str(e)
    return None


def _env_name(v: Any) -> str | None:
    if not v or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        return None
    return "must be an environment variable's name"


DEPLOYMENT_KEYS: dict[str, Key] = {
    "provider": Key(str, "openai", _one_of("openai")),
    "base_url": Key(str, "https://api.openai.com/v1", _upstream_url),
    "model": Key(str, ""),              # the upstream's own name ("": the public name)
    "api_key_env": Key(str, "", _env_name),
    "headers": Key(dict, {}, _headers_table),
    "weight": Key(int, 1, _positive, range=(1, 1_000_000)),
    "max_connections": Key(int, 64, _positive, range=(1, 100_000)),
    "connect_timeout_s": Key(NUM, 3.0, _positive, range=(0, HOUR)),
    "first_byte_timeout_s": Key(NUM, 60.0, _positive, range=(0, HOUR)),
    "idle_timeout_s": Key(NUM, 30.0, _positive, range=(0, HOUR)),
    "total_timeout_s": Key(NUM, 0.0, _non_negative, range=(0, DAY)),
    "breaker_failures": Key(int, 5, _non_negative, range=(0, 1_000_000)),
    "breaker_cooldown_s": Key(NUM, 10.0, _non_negative, range=(0, HOUR)),
    "ca_file": Key(str, ""),
}
MODEL_KEYS["openai"] = {**ROUTER_KEYS, **DEPLOYMENT_KEYS}

DEFAULT_MODELS: dict[str, dict[str, Any]] = {"echo": {"provider": "echo", "token_delay_ms": 0}}


class Section:
    """A checked table (`cfg.server.bind`). Each section is a frozen dataclass
    below whose fields mirror its SCHEMA table: the schema holds the keys'
    types, defaults, checks and ranges; the dataclass gives the type checker
    the same names and types (tests/test_config.py keeps the two equal)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(cast(Any, self))}


@dataclass(frozen=True, slots=True)
class ServerSection(Section):
    bind: list[str]
    tls_bind: list[str]
    workers: int
    backlog: int
    max_connections: int
    max_header_bytes: int
    max_body_bytes: int
    max_upload_bytes: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    send_timeout: float
    request_timeout: float
    graceful_timeout: float
    worker_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_worker_rss_mb: int
    max_pipeline: int
    write_buffer_bytes: int
    sse_ping_s: float
    ws_ping_s: float
    ws_idle_timeout: float
    pid_file: str
    loop: str


@dataclass(frozen=True, slots=True)
class LogSection(Section):
    level: str
    error_log: str
    access_log: str


@dataclass(frozen=True, slots=True)
class StatsSection(Section):
    allow: list[str]
    max_workers: int
    max_routes: int
    max_models: int
    max_deployments: int


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One [[auth.keys]] table: the key is known only by its SHA-256 digest."""

    name: str
    sha256: str
    rpm: int
    tpm: int
    daily_tokens: int
    models: list[str]


@dataclass(frozen=True, slots=True)
class AuthSection(Section):
    enabled: bool
    protect: list[str]
    open: list[str]
    # Not a schema key: the [[auth.keys]] tables, checked by AUTH_KEY_KEYS.
    keys: tuple[KeySpec, ...] = ()


@dataclass(frozen=True, slots=True)
class StateSection(Section):
    max_keys: int
    backend: str
    url: str
    on_redis_error: str
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class PluginsSection(Section):
    paths: list[str]
    enabled: list[str]
    setup_timeout: float
    max_state_keys: int
    # Not a schema key: each plugin's own [plugins.<name>] table, checked by the plugin.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FirewallSection(Section):
    allow: list[str]
    deny: list[str]
    max_connections_per_ip: int
    rps_per_ip: int
    deny_user_agents: list[str]
    deny_paths: list[str]
    trusted_proxies: list[str]


@dataclass(frozen=True, slots=True)
class CacheSection(Section):
    max_entries: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class TlsSection(Section):
    cert_file: str
    key_file: str
    ca_file: str


# The dataclass of each SCHEMA table, in the schema's order.
SECTIONS: dict[str, type[Section]] = {
    "server": ServerSection, "log": LogSection, "stats": StatsSection, "auth": AuthSection,
    "state": StateSection, "plugins": PluginsSection, "firewall": FirewallSection,
    "cache": CacheSection, "tls": TlsSection,
}


@dataclass(frozen=True, slots=True)
class Config:
    """A checked configuration: one typed section per schema table, plus the
    [models.*] tables as dicts (their keys depend on the provider)."""

    path: str | None
    server: ServerSection
    log: LogSection
    stats: StatsSection
    auth: AuthSection
    state: StateSection
    plugins: PluginsSection
    models: dict[str, dict[str, Any]]
    tls: TlsSection
    firewall: FirewallSection
    cache: CacheSection

    @property
    def binds(self) -> list[tuple[str, int]]:
        return [parse_bind(a) for a in self.server.bind]

    @property
    def tls_binds(self) -> list[tuple[str, int]]:
        return [parse_bind(a) for a in self.server.tls_bind]

    @property
    def worker_count(self) -> int:
        return self.server.workers or os.cpu_count() or 1


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number"
    return {int: "an integer", str: "a string", list: "a list", bool: "true or false",
            dict: "a table"}.get(t, t.__name__)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _check_value(where: str, key: str, spec: Key, value: Any) -> Any:
    # bool is an int subclass in Python; TOML true must not pass as a number.
    if isinstance(value, bool) and spec.type is not bool:
        raise ConfigError(f"{where}: {key} must be {_type_name(spec.type)}, got {value!r}")
    if spec.type is list and isinstance(value, str):
        value = [value]
    if not isinstance(value, spec.type):
        raise ConfigError(f"{where}: {key} must be {_type_name(spec.type)}, got {value!r}")
    number = cast(float, value)
    if spec.numeric and not math.isfinite(number):
        raise ConfigError(f"{where}: {key} must be a finite number (got {value!r})")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ConfigError(f"{where}: {key} {problem} (got {value!r})")
    if spec.numeric:
        lo, hi = spec.bounds
        if not lo <= number <= hi:
            raise ConfigError(f"{where}: {key} must be between {_number(lo)} and "
                              f"{_number(hi)} (got {value!r})")
    if spec.type is NUM:
        return float(number)  # 10 and 10.0 mean the same: one type for whoever reads it
    return value


def _check_table(where: str, prefix: str, keys: dict[str, Key], table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{prefix}] must be a table")
    for k in table:
        if k not in keys:
            raise ConfigError(f"{where}: unknown key '{prefix}.{k}'")
    out = {}
    for k, spec in keys.items():
        if k in table:
            out[k] = _check_value(where, f"{prefix}.{k}", spec, table[k])
        else:
            d = spec.default
            out[k] = list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d
    return out


def _check_models(where: str, models: Any, plugins: bool = False) -> dict[str, dict[str, Any]]:
    """Check the [models.*] tables. A provider that is not built in may come from
    a plugin (app.add_provider) when plugins are enabled: its table is handed to
    the plugin's factory as is, and the name is checked once plugins are loaded
    (check_providers)."""
    if not isinstance(models, dict):
        raise ConfigError(f"{where}: [models] must be a table of model tables")
    out = {}
    for name, table in models.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: models.{name} must be a table")
        provider = table.get("provider", "openai" if "deployments" in table else "echo")
        if not isinstance(provider, str):
            raise ConfigError(f"{where}: models.{name}.provider: expected a string, "
                              f"got {type(provider).__name__}")
        keys = MODEL_KEYS.get(provider)
        if keys is None:
            if plugins:
                if "max_output_tokens" in table:
                    _check_value(where, f"models.{name}.max_output_tokens", MAX_OUTPUT_TOKENS,
                                 table["max_output_tokens"])
                out[name] = dict(table)
                for k, spec in CACHE_KEYS.items():  # read by the server, not the plugin
                    if k in table:
                        out[name][k] = _check_value(where, f"models.{name}.{k}", spec, table[k])
                continue
            raise ConfigError(f"{where}: models.{name}.provider: unknown provider {provider!r} "
                              f"(built in: {', '.join(sorted(MODEL_KEYS))}; plugins.enabled "
                              f"is empty, so no plugin adds one)")
        if provider == "openai":
            out[name] = _check_openai(where, name, table)
        else:
            out[name] = _check_table(where, f"models.{name}", keys, table)
    _check_fallbacks(where, out)
    return out


def _check_openai(where: str, name: str, table: dict[str, Any]) -> dict[str, Any]:
    """An `openai` model: its router keys, and its deployments (inline: one, from
    the model's own table) checked with DEPLOYMENT_KEYS, each with its `model`
    defaulting to the public name and its `ca_file` readable. The result has
    the router keys and `deployments`, a list of deployment tables."""
    prefix = f"models.{name}"
    if "deployments" in table:
        deps = table["deployments"]
        inline = [k for k in table if k not in ROUTER_KEYS and k != "deployments"]
        if inline:
            raise ConfigError(f"{where}: {prefix}.{inline[0]}: a deployment's key goes in its "
                              f"[[{prefix}.deployments]] table when the model has those")
        if not isinstance(deps, list) or not deps or not all(isinstance(d, dict) for d in deps):
            raise ConfigError(f"{where}: {prefix}.deployments must be a non-empty array of "
                              f"tables ([[{prefix}.deployments]])")
        out = _check_table(where, prefix, ROUTER_KEYS, {k: v for k, v in table.items()
                                                        if k != "deployments"})
        tables = [(f"{prefix}.deployments[{i}]", d) for i, d in enumerate(deps)]
    else:
        both = _check_table(where, prefix, MODEL_KEYS["openai"], table)
        out = {k: both[k] for k in ROUTER_KEYS}
        tables = [(prefix, {k: v for k, v in table.items() if k not in ROUTER_KEYS})]
    out["deployments"] = []
    for p, d in tables:
        dep = _check_table(where, p, DEPLOYMENT_KEYS, d)
        dep["model"] = dep["model"] or name
        if dep["ca_file"] and not os.access(dep["ca_file"], os.R_OK):
            raise ConfigError(f"{where}: {p}.ca_file: cannot read {dep['ca_file']!r}")
        out["deployments"].append(dep)
    return out


def _check_fallbacks(where: str, models: dict[str, dict[str, Any]]) -> None:
    """Every fallback names a configured model other than its own, and following
    fallbacks never comes back to a model (a cycle would bounce a request
    between failing models)."""
    for name, table in models.items():
        for fb in table.get("fallbacks", ()):
            if fb == name:
                raise ConfigError(f"{where}: models.{name}.fallbacks: a model cannot fall "
                                  f"back to itself")
            if fb not in models:
                raise ConfigError(f"{where}: models.{name}.fallbacks: unknown model {fb!r} "
                                  f"(configured: {', '.join(sorted(models))})")

    def visit(name: str, path: list[str]) -> None:
        for fb in models[name].get("fallbacks", ()):
            if fb in path:
                cycle = " -> ".join([*path[path.index(fb):], fb])
                raise ConfigError(f"{where}: models.{path[0]}.fallbacks: a cycle of "
                                  f"fallbacks ({cycle})")
            visit(fb, [*path, fb])

    for name in models:
        visit(name, [name])


def warnings(cfg: Config, environ: dict[str, str] | None = None) -> list[str]:
    """What `neurohttpd check` and the master's start warn about without
    refusing the config: an api_key_env variable that is not set (requests to
    that deployment get a 500 naming the model until it is)."""
    env = os.environ if environ is None else environ
    out = []
    for name, table in cfg.models.items():
        for i, dep in enumerate(table.get("deployments", ())):
            var = dep["api_key_env"]
            if var and not env.get(var):
                where = f"models.{name}" + (f".deployments[{i}]"
                                            if len(table["deployments"]) > 1 else "")
                out.append(f"{cfg.path or '<defaults>'}: {where}.api_key_env: the "
                           f"environment variable {var} is not set (requests to model "
                           f"{name!r} will fail with 500 until it is)")
    return out


def _check_keys(where: str, keys: Any, models: dict[str, dict[str, Any]]) -> tuple[KeySpec, ...]:
    """Check the [[auth.keys]] tables: names and digests unique, models known."""
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ConfigError(f"{where}: auth.keys must be an array of tables ([[auth.keys]])")
    out: list[KeySpec] = []
    names: set[str] = set()
    digests: set[str] = set()
    for i, table in enumerate(keys):
        prefix = f"auth.keys[{i}]"
        for required in ("name", "sha256"):
            if required not in table:
                raise ConfigError(f"{where}: {prefix}.{required} is required")
        spec = KeySpec(**_check_table(where, prefix, AUTH_KEY_KEYS, table))
        if spec.name in names:
            raise ConfigError(f"{where}: {prefix}.name: {spec.name!r} is used by another key")
        if spec.sha256 in digests:
            raise ConfigError(f"{where}: {prefix}.sha256: the same key is listed twice "
                              f"(as {spec.name!r} and an earlier key)")
        for m in spec.models:
            if m not in models:
                raise ConfigError(f"{where}: {prefix}.models: unknown model {m!r} "
                                  f"(configured: {', '.join(sorted(models))})")
        names.add(spec.name)
        digests.add(spec.sha256)
        out.append(spec)
    return tuple(out)


def check_providers(cfg: Config, providers: dict[str, Any]) -> None:
    """Once plugins are loaded: every model's provider is built in or added by one."""
    for name, table in cfg.models.items():
        provider = table.get("provider", "echo")
        if provider not in MODEL_KEYS and provider not in providers:
            added = ", ".join(sorted(providers)) or "none"
            raise ConfigError(f"{cfg.path or '<defaults>'}: models.{name}.provider: unknown "
                              f"provider {provider!r} (built in: {', '.join(sorted(MODEL_KEYS))};"
                              f" added by plugins: {added})")


def from_dict(data: dict[str, Any], path: str | None = None) -> Config:
    """Check a parsed TOML document; raise ConfigError naming the key and file."""
    where = path or "<defaults>"
    tables: dict[str, dict[str, Any]] = {}
    plugin_options: dict[str, dict[str, Any]] = {}
    auth_keys: Any = []
    for k in data:
        if k not in SCHEMA and k != "models":
            raise ConfigError(f"{where}: unknown section or key '{k}'")
    for name, keys in SCHEMA.items():
        table = data.get(name, {})
        if name == "plugins" and isinstance(table, dict):
            plugin_options = {k: v for k, v in table.items() if isinstance(v, dict)}
            table = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if name == "auth" and isinstance(table, dict) and "keys" in table:
            table = dict(table)
            auth_keys = table.pop("keys")
        tables[name] = _check_table(where, name, keys, table)
    enabled = tables["plugins"]["enabled"]
    for k in plugin_options:
        if k not in enabled:
            raise ConfigError(f"{where}: [plugins.{k}] configures a plugin that is not in "
                              f"plugins.enabled")
    models = _check_models(where, data["models"], bool(enabled)) if "models" in data else {}
    if not models:
        models = _check_models(where, DEFAULT_MODELS)
    _check_listeners(where, tables["server"], tables["tls"])
    _check_router_room(where, tables["stats"]["max_deployments"], models)
    key_specs = _check_keys(where, auth_keys, models)
    if tables["auth"]["enabled"] and not key_specs:
        raise ConfigError(f"{where}: auth.enabled is true but there is no [[auth.keys]] table "
                          f"(every request would get 401); add one with `neurohttpd keys new`")
    return Config(path, server=ServerSection(**tables["server"]), log=LogSection(**tables["log"]),
                  stats=StatsSection(**tables["stats"]),
                  auth=AuthSection(**tables["auth"], keys=key_specs),
                  state=StateSection(**tables["state"]),
                  plugins=PluginsSection(**tables["plugins"], options=plugin_options),
                  models=models, tls=TlsSection(**tables["tls"]),
                  firewall=FirewallSection(**tables["firewall"]),
                  cache=CacheSection(**tables["cache"]))


def _check_router_room(where: str, room: int, models: dict[str, dict[str, Any]]) -> None:
    """[stats] max_deployments, when set, holds every deployment and model."""
    from .shared.deployments import records_needed
    need = records_needed(models)
    if room and room < need:
        raise ConfigError(f"{where}: stats.max_deployments = {room} is below the {need} "
                          f"records the [models.*] tables need (one per deployment and per "
                          f"model; 0 computes it)")


def _check_listeners(where: str, server: dict[str, Any], tls: dict[str, Any]) -> None:
    """bind and tls_bind together: at least one address, none in both (or twice),
    and a certificate when there is a TLS listener."""
    plain, secure = server["bind"], server["tls_bind"]
    if not plain and not secure:
        raise ConfigError(f"{where}: server.bind needs at least one address "
                          f"(or server.tls_bind one)")
    seen: dict[tuple[str, int], str] = {}
    for key, addrs in (("server.bind", plain), ("server.tls_bind", secure)):
        for a in addrs:
            host, port = parse_bind(a)
            other = seen.get((host, port))
            if other is not None and port != 0:
                raise ConfigError(f"{where}: {key} {a!r}: the same address is also in {other}")
            seen[(host, port)] = key
    if secure and not tls["cert_file"]:
        raise ConfigError(f"{where}: server.tls_bind needs tls.cert_file (and tls.key_file, "
                          f"unless the key is in the certificate file)")


def load(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Load and check `path` (None: embedded defaults), then apply CLI overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        path = os.path.abspath(path)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return from_dict(data, path)
