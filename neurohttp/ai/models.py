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
    count (gateway.GatewayFigures; None: not counted)."""

    def __init__(self, models: dict[str, dict[str, Any]],
                 extra_providers: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
                 upstream: Any = None, figures: Any = None) -> None:
        factories = {**BUILTIN_PROVIDERS, **(extra_providers or {})}
        self.models: dict[str, Any] = {}
        self.providers: dict[str, str] = {}  # model -> its provider's name ("echo", a plugin's)
        # per model: the ceiling on a request's max_tokens
        self.max_output_tokens: dict[str, int] = {}
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
        self.default = "echo" if "echo" in self.models else next(iter(self.models))

    def get(self, name: str | None) -> tuple[str, Any]:
        """(public name, provider) for `name`, the default model when None."""
        key = name or self.default
        provider = self.models.get(key)
        if provider is None:
            raise UnknownModel(key)
        return key, provider

    def names(self) -> list[str]:
        return list(self.models)

    def deployments(self) -> list[tuple[str, int]]:
        """(model, index) of every upstream deployment, in config order."""
        return [(name, d.index) for name, p in self.models.items()
                for d in getattr(p, "deployments", ())]

    def provider_name(self, model: str) -> str:
        """The provider `model` is served by, as [models.<name>] provider names it."""
        return self.providers.get(model, "?")
