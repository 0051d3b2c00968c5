"""The AI gateway: public models served by OpenAI-compatible upstreams.

    deployment.py       one upstream of a model: pool settings, path, key, figures
    router.py           which deployment serves a request (the router's contract)
    openai_provider.py  the `openai` provider: requests out, provider events in
    errors.py           upstream failures -> ProviderError kinds (the client's status)
    figures.py          per-deployment figures in the stats block

docs/ROUTING.md says how to configure it; docs/ARCHITECTURE.md "Gateway" how it works.
"""

from .deployment import Deployment
from .errors import AttemptError
from .figures import GatewayFigures, stat_names
from .openai_provider import OpenAIProvider
from .router import Attempt, Router

__all__ = ["Attempt", "AttemptError", "Deployment", "GatewayFigures", "OpenAIProvider",
           "Router", "stat_names"]
