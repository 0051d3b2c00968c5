"""The block's sizes, computed from the config when the master starts.

Nothing here is a cap a real config hits: each size is what the config needs
plus room for what may come without a restart (TTIN, reloads that add models,
plugin routes), and `[stats] max_workers`, `max_routes`, `max_models` and
`[state] max_keys` set them outright. What no longer fits is logged once
with the key to raise (the block is sized once, at start: raising it takes a
restart).
"""

from __future__ import annotations

from typing import Any

from ..shared.deployments import records_needed
from ..shared.table import table_capacity
from .layout import Geometry

# /, /health, /stats, /metrics, the dashboard's three files, /v1/chat,
# /v1/chat/completions, /v1/models, /v1/ws, and room for a few more
CORE_ROUTES = 16
PLUGIN_ROUTES = 32     # room for plugin routes
NAMED_KEYS_ROOM = 1024  # plugin counters, keys added by reloads


def _room(n: int, least: int) -> int:
    """`n` and as many again for growth, at least `least` more."""
    return n + max(n, least)


def geometry_for(cfg: Any) -> Geometry:
    stats = cfg.stats
    # each upstream deployment counts as two models (its figures: gateway/figures.py)
    nmodels = len(cfg.models) + 2 * sum(len(m.get("deployments", ())) for m in cfg.models.values())
    # index 0 is "other"; a reload may add models, each with its /v1/models/<name> route
    models = stats.max_models or 1 + _room(nmodels, 8)
    routes = stats.max_routes or 1 + CORE_ROUTES + models + PLUGIN_ROUTES
    max_workers = stats.max_workers or _room(cfg.worker_count, 8)
    # the router's records: a reload's config and the old one live side by side
    # (config.py refuses a max_deployments below what the config needs)
    deployments = stats.max_deployments or 2 * records_needed(cfg.models) + 16
    return Geometry(routes=routes, models=models, max_workers=max_workers,
                    named_keys=table_capacity(NAMED_KEYS_ROOM + _plugin_keys(cfg)
                                              + 4 * _known_keys(cfg)),
                    open_keys=table_capacity(cfg.state.max_keys), deployments=deployments)


def _plugin_keys(cfg: Any) -> int:
    """Room for the plugins' shared counters and figures ([plugins] max_state_keys)."""
    plugins = getattr(cfg, "plugins", None)
    return int(getattr(plugins, "max_state_keys", 0) or 0)


def _known_keys(cfg: Any) -> int:
    """Names the config declares that quotas key on: API keys, each with up to
    three limits (rpm, tpm, daily_tokens)."""
    auth = getattr(cfg, "auth", None)
    keys = getattr(auth, "keys", None) or []
    return 3 * len(keys)
