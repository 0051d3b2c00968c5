"""Which deployment serves a request: the router of one public model.

The contract between the `openai` provider and the router (the policies,
retries, fallbacks, breaker and hedging are built on this interface):

    router = Router(model, deployments, table)   # per worker, per public model
    async for event in router.stream(attempt):   # what the provider yields
        ...

`attempt(deployment)` sends the request to one deployment and returns an
async iterator of provider events (ai/providers: Chunk, Delta, Finish,
Usage). It raises `AttemptError` (gateway/errors.py; a ProviderError whose
`kind` sets the client's status) *before its first event* when the
deployment failed: not reachable, a timeout, an error status (429 with
`retry_after`), an unset API key. `err.retryable` says whether another
deployment may be tried; `err.reason` is the finer cause ("connect",
"first_byte_timeout", "status_503", "no_key", ...).

**The first event is the commit point.** Once `stream()` has yielded an
event, the pipeline may have sent bytes to the client, so nothing is retried
after it: a later failure (an AttemptError with `started` set, or the
iterator ending early) goes to the caller as it is, and the client's stream
ends with an error event in the API's shape. Before it, the router may try
other deployments (`retries`), models (`fallbacks`) or a hedge; when all
fail it raises the last AttemptError (the client gets its status, e.g. 429
with Retry-After, 502, 504).

**Cancellation.** `stream()` returns an async iterator (an async generator
when it wraps attempts; with one attempt and nothing to retry, the attempt's
own iterator, one layer less per event). When the client goes away the
pipeline closes it (`aclose()`) or its task is cancelled; the router must
then close every attempt iterator it opened (their `finally`
closes the upstream response, which aborts its connection: the upstream
sees the close within the loop turn). A hedge's losing attempt is closed
the same way as soon as the other one commits.

**State.** A Router lives in one worker; state every worker must see
(outstanding requests, breaker state, latency) belongs in the shared-memory
block (neurohttp/shared/), keyed by `Deployment.label` and origin. The
figures an attempt records (gateway/figures.py) are already shared.

This implementation (gateway/routing.py, docs/ROUTING.md "Router"): the four
strategies, retries within a shared retry budget, Retry-After, fallbacks,
per-deployment circuit breakers and hedging, on the records every worker
shares (shared/deployments.py). A worker's ModelRegistry builds one `Routes`
for all its models and binds each Router to it; a Router made alone (tests,
tools) routes on a private table of its own, with no fallbacks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from .deployment import Deployment
from .routing import Attempt, Fallback, Routes

__all__ = ["Attempt", "Fallback", "Router", "Routes"]


class Router:
    __slots__ = ("model", "deployments", "table", "routes")

    def __init__(self, model: str, deployments: Sequence[Deployment],
                 table: Mapping[str, Any]) -> None:
        if not deployments:
            raise ValueError(f"model {model!r} has no deployment")
        self.model = model
        self.deployments = list(deployments)
        self.table = table        # the model's config: strategy, retries, fallbacks, ...
        self.routes: Routes | None = None

    def bind(self, routes: Routes) -> None:
        """Route on the worker's shared `routes` (ai/models.py ModelRegistry)."""
        self.routes = routes

    def fallbacks(self, messages: Any, params: Any, whole: bool) -> Fallback | None:
        """The fallback attempts of a request (None when the model has no fallbacks)."""
        routes = self.routes
        if routes is None or len(routes.chains[self.model]) < 2:
            return None
        return routes.fallback_for(messages, params, whole)

    def stream(self, attempt: Attempt, fallback: Fallback | None = None) -> AsyncIterator[Any]:
        """The events of the request, from the deployment(s) chosen (see the
        module doc). `fallback(model)`: the attempt of the same request to
        fallback model `model` (the Routes' models; None: no fallback)."""
        routes = self.routes
        if routes is None:
            routes = self.routes = Routes.build({self.model: self.table},
                                                {self.model: self.deployments})
        return routes.stream(self.model, attempt, fallback)
