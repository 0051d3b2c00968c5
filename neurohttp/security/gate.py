"""The admission step: the one place a request is admitted, before it is routed
to a model (the App calls it first when `[auth] enabled` or the firewall has
request rules).

    firewall (firewall.py): client behind trusted proxies, deny/allow, paths,
      user agents, per-client rate                                   -> 403 / 429
    path protected ([auth] protect / open)?  no -> routed as is
    key: Authorization: Bearer KEY or x-api-key   missing/malformed/wrong -> 401
    model (routes that name one) in the key's `models`?                   no -> 403
    quotas (model routes): rpm, tpm, daily tokens, one lock / round trip  over -> 429
    -> routed; every response of a keyed request carries x-ratelimit-* headers

Tokens are charged as they are used, through `charge` (the usage event's
subscriber), so a stream that runs past tpm finishes and the next request
waits. See docs/SECURITY.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import error_response
from ..messages import Request, Response, StreamingResponse, WebSocketUpgrade
from ..shared.keylimits import DAILY, REQUESTS, KeyLimits, KeyVerdict
from .keys import INVALID, MALFORMED, MISSING, REASONS, ApiKey, KeyRing
from .quotas import (
    REDIS_ERRORS,
    REDIS_FAIL_CLOSED,
    REDIS_FAIL_OPEN,
    RedisDown,
    RedisQuotas,
)

log = logging.getLogger("neurohttp")

# Routes whose requests are admitted against quotas, and where their model is.
CHAT = 1         # POST /v1/chat: "model" in the body, the default model without one
COMPLETIONS = 2  # POST /v1/chat/completions: "model" in the body
SOCKET = 3       # GET /v1/ws: one request (its prompts' tokens are charged as used)
MODEL = 4        # GET /v1/models/NAME: the models check only
METERED = 5      # a path under a plugin's mount (openai_proxy): counted against rpm, any method
_KINDS = {"/v1/chat": ("POST", CHAT), "/v1/chat/completions": ("POST", COMPLETIONS),
          "/v1/ws": ("GET", SOCKET)}
_MODELS_PREFIX = "/v1/models/"

AUTH_FAILURES = "auth:401:"  # + reason: exact counters in the named table

_MESSAGES = {
    MISSING: ("You didn't provide an API key. Send it in an Authorization header "
              "using Bearer auth (Authorization: Bearer YOUR_KEY) or in x-api-key.",
              "missing_api_key"),
    MALFORMED: ("The Authorization header is malformed: expected 'Bearer' and one API key.",
                "invalid_authorization_header"),
    INVALID: ("Incorrect API key provided.", "invalid_api_key"),
}
_CHALLENGE = {MISSING: 'Bearer realm="neurohttp"',
              MALFORMED: 'Bearer realm="neurohttp", error="invalid_request"',
              INVALID: 'Bearer realm="neurohttp", error="invalid_token"'}
_LIMIT_NAMES = {REQUESTS: "requests per minute (RPM)", "tokens": "tokens per minute (TPM)",
                DAILY: "tokens per day (UTC)"}


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it (Go's duration format, to the
    millisecond): "0s", "20ms", "6s", "17.28s", "1m0s", "2h3m4.5s"."""
    ms = int(seconds * 1000 + 0.999999)  # up to the millisecond
    if ms < 1000:  # the usual cases first: this runs for every header of every answer
        return f"{ms}ms" if ms > 0 else "0s"
    if ms < 60_000:
        if ms % 1000:
            return f"{ms // 1000}.{ms % 1000:03d}".rstrip("0") + "s"
        return f"{ms // 1000}s"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    return f"{h}h{m}m{sec}s" if h else f"{m}m{sec}s"


class Rule:
    __slots__ = ("protected", "method", "kind")

    def __init__(self, protected: bool, method: str | None, kind: int) -> None:
        self.protected = protected
        self.method = method
        self.kind = kind


class Gate:
    """Keys, the models check and quotas for every request (see the module doc).

    `quotas` is a ShmQuotas or RedisQuotas (quotas.py); `count` adds to an exact
    counter of the named table (401s by reason)."""

    def __init__(self, ring: KeyRing, quotas: Any, protect: list[str], open_: list[str],
                 default_model: str, count: Callable[[str], Any], firewall: Any = None,
                 auth: bool = True) -> None:
        # the firewall's request rules (firewall.py Firewall.check), run first
        self.firewall = firewall
        self.auth = auth  # [auth] enabled: keys are asked for (else no path is protected)
        self.ring = ring
        self.quotas = quotas
        self.protect = tuple(protect)
        self.open = tuple(open_)
        self.default_model = default_model
        self.count = count
        self._rules: dict[bytes, Rule] = {}
        for k in ring.keys:
            k.rate_format = rate_format(k.limits)
        # App.mounted: a path a plugin's mount takes is admitted against the key's
        # rpm like a model route (its body is not read: no model check)
        self.metered: Callable[[str], Any] | None = None

    # ------------------------------------------------------------ routing rules
    def rule(self, req: Request) -> Rule:
        """The rule of the request's path, cached by its raw target (like the
        router's raw_routes: the common request's path is never decoded)."""
        r = self._rules.get(req.target)
        if r is None:
            path = req.path  # decoded: the rule is the path's the router will see
            protected = path.startswith(self.protect) and not path.startswith(self.open)
            method, kind = _KINDS.get(path, (None, 0))
            if kind == 0 and path.startswith(_MODELS_PREFIX):
                method, kind = "GET", MODEL
            elif kind == 0 and self.metered is not None and self.metered(path):
                method, kind = None, METERED
            r = Rule(protected, method, kind)
            if len(self._rules) >= 4096:  # a bound: paths are whatever clients send
                self._rules.clear()
            self._rules[req.target] = r
        return r

    # ------------------------------------------------------------ the step
    def handle(self, req: Request, dispatch: Callable[[Request], Any]) -> Any:
        """Admit `req` and route it with `dispatch`, or refuse it."""
        fw = self.firewall
        if fw is not None:
            refused = fw.check(req)
            if refused is not None:
                return refused
            if not self.auth:  # the firewall alone: nothing more to admit
                return dispatch(req)
        rule = self._rules.get(req.target) or self.rule(req)
        if not rule.protected:
            return dispatch(req)
        key = self.ring.identify(req.raw_headers)
        if key.__class__ is not ApiKey:
            return self.unauthorized(req, key)  # type: ignore[arg-type]  # a reason
        req.key = key
        assert isinstance(key, ApiKey)
        kind = rule.kind
        if not kind or req.method != rule.method and kind != METERED:
            return self.finish(req, key, None, dispatch(req), True)
        if key.models is not None and kind != SOCKET and kind != METERED:
            model = self._model(req, kind)
            if model is not None and model not in key.models:
                return self.forbidden(req, key, model)
        if kind == MODEL:
            return self.finish(req, key, None, dispatch(req), True)
        try:
            v = self.quotas.admit(key.limits)
        except RedisDown:
            return self.unavailable(req)
        if v.__class__ is not KeyVerdict:
            if v is None:  # Redis down, fail_open: the figures last seen, if any
                return self.finish(req, key, None, dispatch(req), False)
            return self._admit_later(req, key, v, dispatch)
        if not v[0]:
            return self.too_many(req, key, v)
        result = dispatch(req)
        if key.limits.limited:
            cls = result.__class__
            if cls is Response or cls is StreamingResponse or cls is WebSocketUpgrade:
                # (a model route's answer is its own object: decorated in place)
                result.trusted_headers += rate_lines(key, v)
                return result
            return self.finish(req, key, v, result, False)
        return result

    def _model(self, req: Request, kind: int) -> str | None:
        """The model the request names, or None when it cannot be read (the
        handler then answers 400 for the body, and nothing was charged)."""
        if kind == MODEL:
            return req.path[len(_MODELS_PREFIX):]
        try:
            body = req.json()  # parsed once: the handler reads the same object
        except ValueError:
            return None
        if type(body) is not dict:
            return None
        model = body.get("model")
        if model is None and kind == CHAT:
            return self.default_model
        return model if type(model) is str else None

    async def _admit_later(self, req: Request, key: ApiKey, pending: Awaitable[Any],
                           dispatch: Callable[[Request], Any]) -> Any:
        try:
            v = await pending
        except RedisDown:
            return self.unavailable(req)
        if v is not None and not v.allowed:
            return self.too_many(req, key, v)
        result = dispatch(req)
        if hasattr(result, "__await__"):
            result = await result
        return self._decorate(key, v, result, False)

    # ------------------------------------------------------------ answers
    def finish(self, req: Request, key: ApiKey, v: KeyVerdict | None, result: Any,
               shared: bool) -> Any:
        """The x-ratelimit-* headers on the handler's answer (an awaitable one
        when it comes). `shared`: the answer may be an object the handler
        gives every request (e.g. /health's per-second Response): decorate a copy."""
        if not key.limits.limited:
            return result
        if v is None:
            v = self.quotas.peek(key.limits)
            if v is None:
                return result
        if hasattr(result, "__await__"):
            return self._finish_later(key, v, result, shared)
        return self._decorate(key, v, result, shared)

    async def _finish_later(self, key: ApiKey, v: KeyVerdict, pending: Awaitable[Any],
                            shared: bool) -> Any:
        return self._decorate(key, v, await pending, shared)

    def _decorate(self, key: ApiKey, v: KeyVerdict | None, result: Any, shared: bool) -> Any:
        if v is None or not key.limits.limited:
            return result
        cls = result.__class__
        if cls is Response:
            if shared:
                result = Response(result.body, result.status, dict(result.headers),
                                  result.content_type, result.trusted_headers)
        elif cls is not StreamingResponse and cls is not WebSocketUpgrade:
            return result
        result.trusted_headers += rate_lines(key, v)
        return result

    def unauthorized(self, req: Request, reason: str) -> Response:
        self.count(AUTH_FAILURES + reason)
        message, code = _MESSAGES[reason]
        return error_response(req, 401, message, type="invalid_request_error", code=code,
                              headers={"WWW-Authenticate": _CHALLENGE[reason]})

    def forbidden(self, req: Request, key: ApiKey, model: str) -> Any:
        self.quotas.forbidden(key.limits)
        resp = error_response(req, 403, f"the key '{key.name}' may not use the model "
                              f"'{model}'", type="invalid_request_error",
                              code="model_not_allowed", param="model")
        return self.finish(req, key, None, resp, False)

    def too_many(self, req: Request, key: ApiKey, v: KeyVerdict) -> Response:
        lim = key.limits
        limit = {REQUESTS: lim.rpm, DAILY: lim.daily}.get(v.refused, lim.tpm)
        wait = duration(v.retry_after)
        resp = error_response(
            req, 429, f"Rate limit reached for key '{key.name}' on {_LIMIT_NAMES[v.refused]}: "
            f"limit {limit}. Please try again in {wait}.",
            type="requests" if v.refused == REQUESTS else "tokens",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(v.retry_after)))})
        resp.trusted_headers += rate_lines(key, v)
        return resp

    def unavailable(self, req: Request) -> Response:
        return error_response(req, 503, "the rate-limit store is unavailable; try again "
                              "shortly", type="server_error", code="quota_store_unavailable",
                              headers={"Retry-After": "1"})

    # ------------------------------------------------------------ usage
    # The gate subscribes to the usage sink (context.UsageSubscriber): every
    # generation's tokens reach it as they are used.
    def charge(self, model: str, key: str | None, prompt_tokens: int,
               completion_tokens: int) -> None:
        """Tokens a key used (the prompt when a generation starts, completion
        tokens as they stream): charged to its tpm and day, into debt if need
        be, and counted in its figures."""
        if key is None:
            return
        k = self.ring.by_name.get(key)
        if k is not None and (prompt_tokens or completion_tokens):
            self.quotas.charge(k.limits, prompt_tokens, completion_tokens)

    def report(self, event: Any, request: Any) -> None:
        """A generation ended: its tokens were charged as they came."""

    # ------------------------------------------------------------ figures
    def figures(self, read: Callable[[str], int]) -> dict[str, Any]:
        """/stats "auth": per key (by name) and the 401s by reason."""
        keys = {k.name: self.quotas.figures(k.limits) for k in self.ring.keys}
        doc: dict[str, Any] = {"keys": keys,
                               "unauthorized": {r: read(AUTH_FAILURES + r) for r in REASONS}}
        if isinstance(self.quotas, RedisQuotas):
            doc["redis"] = {"errors": read(REDIS_ERRORS), "fail_open": read(REDIS_FAIL_OPEN),
                            "fail_closed": read(REDIS_FAIL_CLOSED)}
        return doc


def rate_format(lim: KeyLimits) -> str:
    """The key's x-ratelimit-* lines with its limits filled in (made once per
    key): what is left and the resets are filled per response (rate_lines)."""
    text = ""
    if lim.rpm:
        text += (f"x-ratelimit-limit-requests: {lim.rpm}\r\n"
                 "x-ratelimit-remaining-requests: %d\r\nx-ratelimit-reset-requests: %s\r\n")
    if lim.tpm:
        text += (f"x-ratelimit-limit-tokens: {lim.tpm}\r\n"
                 "x-ratelimit-remaining-tokens: %d\r\nx-ratelimit-reset-tokens: %s\r\n")
    return text


_DAY = ("x-ratelimit-limit-tokens-day: %d\r\nx-ratelimit-remaining-tokens-day: %d\r\n"
        "x-ratelimit-reset-tokens-day: %s\r\n")


def rate_lines(key: ApiKey, v: KeyVerdict) -> bytes:
    """OpenAI's x-ratelimit-* header lines for the key's limits (only those it
    has), as Response.trusted_headers: the values are numbers and durations
    made here, the names fixed, so no field needs checking per response."""
    lim = key.limits
    if lim.rpm:
        if lim.tpm:
            text = key.rate_format % (v[3], duration(v[4]), v[5], duration(v[6]))
        else:
            text = key.rate_format % (v[3], duration(v[4]))
    elif lim.tpm:
        text = key.rate_format % (v[5], duration(v[6]))
    else:
        text = ""
    if lim.daily and (v[1] or v[7] < lim.daily // 10):
        # beyond OpenAI's set; sent when the day is nearly spent or refused
        text += _DAY % (lim.daily, v[7], duration(v[8]))
    return text.encode("ascii")
