"""Public model names mapped to provider instances, from `[models.*]`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import MAX_OUTPUT_TOKENS
from .providers.echo import EchoProvider

BUILTIN_PROVIDERS: dict[str, Callable[[dict[str, Any]], Any]] = {"echo": EchoProvider}


class UnknownModel(KeyError):
    pass


class ModelRegistry:
    """`upstream`: the worker's upstream client, which `openai` models send
    through (made here when not given); `figures`: where their deployments
    count (gateway.GatewayFigures; None: not counted); `router_table`: the
    block's router records (shared/deployments.py) and `slot` this worker's
    stats slot, which the models' routers share with every worker (None: a
    table of this process's own)."""

    def __init__(self, models: dict[str, dict[str, Any]],
                 extra_providers: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
                 upstream: Any = None, figures: Any = None, router_table: Any = None,
                 slot: int = 1) -> None:
        factories = {**BUILTIN_PROVIDERS, **(extra_providers or {})}
        self.models: dict[str, Any] = {}
        self.providers: dict[str, str] = {}  # model -> its provider's name ("echo", a plugin's)
        # per model: the ceiling on a request's max_tokens
        self.max_output_tokens: dict[str, int] = {}
        # per model that caches (cache_ttl_s > 0): (ttl, cache_nondeterministic)
        self.cache: dict[str, tuple[float, bool]] = {}
        self.upstream = upstream
        for name, options in models.items():
            provider = options.get("provider", "echo")
            if provider == "openai" and "openai" not in (extra_providers or {}):
                from ..gateway import OpenAIProvider
                from ..upstream import UpstreamClient
                if self.upstream is None:
                    self.upstream = UpstreamClient()
                self.models[name] = OpenAIProvider(name, options, self.upstream, figures)
            else:
                self.models[name] = factories[provider](options)
            self.providers[name] = provider
            self.max_output_tokens[name] = options.get("max_output_tokens",
                                                       MAX_OUTPUT_TOKENS.default)
            if options.get("cache_ttl_s"):
                self.cache[name] = (float(options["cache_ttl_s"]),
                                    bool(options.get("cache_nondeterministic")))
        self.default = "echo" if "echo" in self.models else next(iter(self.models))
        self.routes: Any = None
        self._bind_routers(models, router_table, slot)

    def _bind_routers(self, models: dict[str, dict[str, Any]], table: Any, slot: int) -> None:
        """One Routes for every model (gateway/routing.py), so that a model can
        fall back to any other, and bind each openai model's router to it."""
        if "openai" not in self.providers.values():
            return
        from ..gateway import OpenAIProvider
        from ..gateway.routing import Routes
        deps = {name: getattr(p, "deployments", None) or [p] for name, p in self.models.items()}
        self.routes = Routes.build(models, deps, table, slot)
        self.routes.providers = self.models
        for p in self.models.values():
            if isinstance(p, OpenAIProvider):
                p.router.bind(self.routes)

    def get(self, name: str | None) -> tuple[str, Any]:
        """(public name, provider) for `name`, the default model when None."""
        key = name or self.default
        provider = self.models.get(key)
        if provider is None:
            raise UnknownModel(key)
        return key, provider

    def names(self) -> list[str]:
        return list(self.models)

    def deployments(self) -> list[Any]:
        """Every upstream deployment (gateway/deployment.py), in config order."""
        return [d for p in self.models.values() for d in getattr(p, "deployments", ())]

    def provider_name(self, model: str) -> str:
        """The provider `model` is served by, as [models.<name>] provider names it."""
        return self.providers.get(model, "?")
