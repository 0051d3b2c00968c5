"""The plugin API (DESIGN §5a) and the loader.

A plugin is a module with `setup(app, options)`. `[plugins] paths` lists the
directories searched for `<name>.py` or `<name>/__init__.py` (relative paths
are relative to the working directory), `enabled` the plugins to load, in
order, and `[plugins.<name>]` is the `options` dict of one plugin. A name not
found in `paths` is imported as an installed module.

Plugins are loaded in each worker, after the fork, so a reload (new workers)
picks up changed plugin code, and a plugin that fails at setup fails its
worker's start: the master backs off and, if no worker can start, exits
showing the error.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import Any

from .ai.providers import Chunk, Delta, Finish, ProviderError, ToolCallDelta, Usage
from .messages import BodyError, Request, Response, StreamingResponse
from .upstream import ErrorKind, HeaderBlock, PoolLimits, Timeouts, UpstreamError

__all__ = ["Request", "Response", "StreamingResponse", "PluginError", "load_plugins",
           # what a provider (app.add_provider) may yield besides text
           "Chunk", "Delta", "Finish", "ProviderError", "ToolCallDelta", "Usage",
           # a streamed body that cannot be read to its end (request.stream())
           "BodyError",
           # app.upstream, the worker's shared upstream client: its settings and errors
           "ErrorKind", "HeaderBlock", "PoolLimits", "Timeouts", "UpstreamError"]

log = logging.getLogger("neurohttp")


class PluginError(Exception):
    """A plugin could not be found or imported, or its setup() failed."""


def _find(name: str, paths: list[str]) -> str | None:
    for d in paths:
        for candidate in (os.path.join(d, f"{name}.py"), os.path.join(d, name, "__init__.py")):
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
    return None


def _import(name: str, paths: list[str]) -> ModuleType:
    path = _find(name, paths)
    if path is None:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise PluginError(f"plugin {name!r} not found in {paths} nor importable: {e}") from e
    modname = f"neurohttp_plugin_{name}"
    spec = importlib.util.spec_from_file_location(
        modname, path, submodule_search_locations=[os.path.dirname(path)]
        if path.endswith("__init__.py") else None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(modname, None)
        raise PluginError(f"plugin {name!r} ({path}) failed to import: "
                          f"{type(e).__name__}: {e}") from e
    return module


def load_plugins(app: Any, paths: list[str], enabled: list[str],
                 options: dict[str, dict[str, Any]]) -> list[ModuleType]:
    """Import every enabled plugin and run its setup(app, options); raise
    PluginError (naming the plugin and the cause) on the first failure."""
    loaded = []
    for name in enabled:
        module = _import(name, paths)
        setup = getattr(module, "setup", None)
        if not callable(setup):
            raise PluginError(f"plugin {name!r} has no setup(app, options) function")
        try:
            setup(app, dict(options.get(name, {})))
        except Exception as e:
            raise PluginError(f"plugin {name!r} setup failed: {type(e).__name__}: {e}") from e
        log.debug("plugin %s loaded from %s", name, getattr(module, "__file__", name))
        loaded.append(module)
    return loaded


def load_configured(app: Any, cfg: Any) -> list[ModuleType]:
    """Load the plugins `cfg` enables into `app`, then check that every [models]
    provider is built in or added by one of them (config.ConfigError if not).
    The worker does this at start and `neurohttpd check` does the same."""
    from .config import check_providers
    loaded = load_plugins(app, cfg.plugins.paths, cfg.plugins.enabled, cfg.plugins.options)
    check_providers(cfg, app.providers)
    return loaded
