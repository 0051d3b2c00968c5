"""What an upstream's failure becomes: a ProviderError whose kind sets the
client's status (ai/providers STATUS, DESIGN.md §4), raised by a deployment's
attempt (`AttemptError`), with what the router needs to decide on a retry.

    upstream failure                         kind                   client gets
    connect refused/unreachable, TLS, closed upstream_unreachable   502
    connect/first-byte/idle/total timeout    upstream_timeout       504
    no free pooled connection in time        upstream_unavailable   503
    closed mid-response, bad HTTP, bad JSON  upstream_error         502
    its 429                                  rate_limited           429 + its Retry-After
    its 503                                  upstream_unavailable   503 + its Retry-After
    its 504                                  upstream_timeout       504
    its 400, 413, 422 (the request is bad)   bad_request            400, its message
    its 401, 403, 404, other 4xx and 5xx     upstream_error         502 (its 401 is not the client's)
    api_key_env not set                      provider_error         500 naming the model

Messages name the model, the deployment and the upstream's origin, never a
header, a URL path or the key (an upstream's own message is relayed only for
a 400, with the key blanked).
"""

from __future__ import annotations

from ..ai.providers import ProviderError
from ..upstream import ErrorKind, UpstreamError
from .deployment import Deployment

_BY_KIND = {
    ErrorKind.CONNECT: "upstream_unreachable", ErrorKind.TLS: "upstream_unreachable",
    ErrorKind.CLOSED: "upstream_unreachable",
    ErrorKind.CONNECT_TIMEOUT: "upstream_timeout", ErrorKind.FIRST_BYTE_TIMEOUT: "upstream_timeout",
    ErrorKind.IDLE_TIMEOUT: "upstream_timeout", ErrorKind.TOTAL_TIMEOUT: "upstream_timeout",
    ErrorKind.POOL_TIMEOUT: "upstream_unavailable",
    ErrorKind.CLOSED_MID_RESPONSE: "upstream_error", ErrorKind.PROTOCOL: "upstream_error",
    ErrorKind.STATUS: "upstream_error",
}
_BY_STATUS = {429: "rate_limited", 503: "upstream_unavailable", 504: "upstream_timeout",
              400: "bad_request", 413: "bad_request", 422: "bad_request"}
# What the router may retry on another deployment (before the first event only).
RETRYABLE = frozenset({"upstream_unreachable", "upstream_timeout", "upstream_unavailable",
                       "rate_limited", "upstream_error"})


class AttemptError(ProviderError):
    """One deployment's failure. `reason` is the finer cause for the figures
    and logs: an ErrorKind value ("connect", "first_byte_timeout", ...),
    "status_<code>", "bad_event" or "no_key". `started`: a response byte had
    come (for a stream: the router had already passed an event on).
    `retryable`: another deployment may be tried (never once an event went on)."""

    def __init__(self, kind: str, message: str, deployment: Deployment, reason: str, *,
                 status: int | None = None, retry_after: float | None = None,
                 started: bool = False, param: str | None = None) -> None:
        super().__init__(kind, message, status=status, retry_after=retry_after, param=param)
        self.deployment = deployment
        self.reason = reason
        self.started = started

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE and not self.started


def _where(dep: Deployment) -> str:
    return f"model {dep.model!r}: deployment {dep.index} ({dep.origin})"


def from_upstream(dep: Deployment, e: UpstreamError, started: bool) -> AttemptError:
    """`started`: an event of this attempt had been passed on."""
    kind = _BY_KIND.get(e.kind, "upstream_error")
    return AttemptError(kind, f"{_where(dep)}: {e.message}", dep, e.kind.value,
                        started=started)


def from_status(dep: Deployment, status: int, retry_after: float | None,
                upstream_message: str | None) -> AttemptError:
    kind = _BY_STATUS.get(status, "upstream_error")
    msg = f"{_where(dep)}: the upstream answered {status}"
    if kind == "bad_request" and upstream_message:
        msg += ": " + dep.scrub(upstream_message)[:1000]
    return AttemptError(kind, msg, dep, f"status_{status}", status=status,
                        retry_after=retry_after)


def bad_event(dep: Deployment, what: str, started: bool = True) -> AttemptError:
    return AttemptError("upstream_error", f"{_where(dep)}: {what}", dep, "bad_event",
                        started=started)


def no_key(dep: Deployment) -> AttemptError:
    return AttemptError("provider_error", f"the model {dep.model!r} is not configured: the "
                        f"environment variable {dep.key_env} (api_key_env of deployment "
                        f"{dep.index}) is not set", dep, "no_key")
