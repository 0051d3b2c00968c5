"""The core routes. `register(app, services)` builds the pipeline and every
core handler on the worker's services (context.Services) and adds their
routes to `app`; the worker calls it once, after the plugins loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ai.pipeline import Pipeline
from ..context import Services
from .chat import SeedChat
from .metrics import MetricsHandlers
from .openai import OpenAIHandlers
from .site import SiteHandlers
from .ws import WebSocketChat

if TYPE_CHECKING:
    from ..app import App


def register(app: App, services: Services) -> Pipeline:
    """Add the core routes to `app`; returns the pipeline they share."""
    SiteHandlers(services).register(app)
    MetricsHandlers(services).register(app)
    pipeline = Pipeline(services)
    SeedChat(pipeline).register(app)
    OpenAIHandlers(pipeline, services.stats.started()).register(app)
    WebSocketChat(pipeline, services.counters).register(app)
    return pipeline
