"""API keys, per-key quotas, the firewall and the admission step (docs/SECURITY.md)."""

from __future__ import annotations

from typing import Any

from ..config import Config
from .firewall import Firewall
from .gate import Gate
from .keys import KeyRing


def build_gate(cfg: Config, state: Any, default_model: str,
               firewall: Any = None) -> Gate:
    """The admission step of a worker ([auth] enabled, or a firewall with request
    rules), over the configured [state] backend; `state` is the block's
    SharedState (after the fork)."""
    from .quotas import RedisQuotas, ShmQuotas

    st = cfg.state
    quotas: ShmQuotas | RedisQuotas
    if not cfg.auth.enabled:  # the firewall alone: no key is asked for, Redis not used
        return Gate(KeyRing(()), ShmQuotas(state.named), [], [], default_model,
                    state.named.add, firewall, auth=False)
    if st.backend == "redis":
        from ..shared.redis_store import RedisStore, connect
        timeout = st.timeout_ms / 1000
        quotas = RedisQuotas(RedisStore(connect(st.url, timeout)), state.named, timeout,
                             st.on_redis_error == "fail_open")
    else:
        quotas = ShmQuotas(state.named)
    return Gate(KeyRing(cfg.auth.keys), quotas, cfg.auth.protect, cfg.auth.open,
                default_model, state.named.add, firewall)


def build_firewall(cfg: Config, state: Any, slot: int) -> Firewall | None:
    """The worker's firewall, or None when [firewall] sets no rule (the default)."""
    fw = Firewall(cfg.firewall, state, slot)
    return fw if fw.active else None
