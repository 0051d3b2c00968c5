"""openai_proxy: the OpenAI paths the core does not serve, passed to an upstream.

    [plugins]
    enabled = ["openai_proxy"]
    [plugins.openai_proxy]
    base_url = "https://api.openai.com/v1"   # the client's /v1 is replaced by its path
    api_key_env = "OPENAI_API_KEY"           # the upstream key's variable ("": none sent)
    paths = ["/v1/embeddings", "/v1/audio", ...]   # prefixes passed through (default below)

Every request under one of `paths` that no core route takes (the core's
/v1/chat/completions, /v1/models, ... always win) goes to `base_url`: the
method, the path (its /v1 replaced by base_url's path), the query, and the
headers minus hop-by-hop fields, the client's credentials and cookies, with
`Authorization: Bearer <the upstream key>` added. The body is streamed to the
upstream as it arrives (multipart uploads included, up to `max_upload_bytes`,
0: [server] max_upload_bytes), and the answer streamed back as it comes, both
with back-pressure: memory per request is a few hundred KiB whatever the size.

With [auth] keys, the request has passed the admission step (key checked: 401
before anything reaches the upstream; counted against the key's rpm). A key
restricted to some `models` gets 403 here: the proxy does not read bodies, so
it cannot tell which model a request names. Upstream failures are answered in
OpenAI's error shape: no connection or a broken answer 502, a timeout 504, all
connections busy 503; the upstream refusing the server's own key (401) is a
502 too, never passed on as the client's 401. Neither the upstream key nor the
upstream's address appears in any answer.

Options besides those three: `max_upload_bytes`, `connect_timeout_s` (3),
`first_byte_timeout_s` (600: a transcription answers after the whole upload
has been processed), `idle_timeout_s` (300: between two reads of the answer,
or while the upstream takes none of the body), `max_connections` (64 per
worker). docs/PLUGINS.md has the rest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

from neurohttp.plugins import (
    ErrorKind,
    HeaderBlock,
    OptionError,
    PoolLimits,
    Request,
    Response,
    StreamingResponse,
    Timeouts,
    UpstreamError,
)

log = logging.getLogger("neurohttp")

DEFAULT_PATHS = ["/v1/embeddings", "/v1/completions", "/v1/moderations", "/v1/audio",
                 "/v1/images", "/v1/files", "/v1/uploads", "/v1/batches", "/v1/fine_tuning",
                 "/v1/responses", "/v1/vector_stores", "/v1/assistants", "/v1/threads"]

# the option schema (checked by the loader, and by `neurohttpd check`)
OPTIONS: dict[str, type] = {
    "base_url": str, "api_key_env": str, "paths": list, "max_upload_bytes": int,
    "connect_timeout_s": float, "first_byte_timeout_s": float, "idle_timeout_s": float,
    "max_connections": int}

# Never passed upstream: per-hop fields (RFC 9110 7.6.1; the upstream client
# sets framing and Host itself), the client's credentials (replaced by the
# server's key), cookies, and what would tell the upstream about our clients.
REQUEST_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "expect", "authorization", "proxy-authorization",
    "x-api-key", "api-key", "cookie", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto", "x-real-ip"})
# Never passed back: per-hop fields and framing (ours), our own Server and Date,
# Content-Type (the answer's own field), and what belongs to the server's
# upstream account rather than to the client.
RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "content-length", "content-type", "server", "date", "set-cookie",
    "www-authenticate", "proxy-authenticate", "openai-organization", "openai-project"})


def _error(status: int, message: str, type_: str, code: str,
           headers: dict[str, str] | None = None) -> Response:
    return Response.json({"error": {"message": message, "type": type_, "param": None,
                                    "code": code}}, status, headers)


def validate(options: dict[str, Any]) -> None:
    """The values' checks (the loader has checked their types)."""
    base_url = options.get("base_url")
    if not base_url:
        raise OptionError("base_url", "required (e.g. \"https://api.openai.com/v1\")")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise OptionError("base_url", "must be an http:// or https:// URL without a query")
    for p in options.get("paths", DEFAULT_PATHS):
        if not isinstance(p, str) or not (p == "/v1" or p.startswith("/v1/")):
            raise OptionError("paths", f"{p!r} is not a path under /v1/")
    if options.get("max_upload_bytes", 0) < 0:
        raise OptionError("max_upload_bytes", "must be >= 0 (0: [server] max_upload_bytes)")
    if options.get("max_connections", 64) < 1:
        raise OptionError("max_connections", "must be >= 1")
    for key in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s"):
        if key in options and not options[key] > 0:
            raise OptionError(key, "must be > 0")


class Proxy:
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        validate(options)  # (the loader did too; setup() may be called directly)
        self.base_url = base_url = options["base_url"]
        self.base_path = urlsplit(base_url).path.rstrip("/").encode()
        env = options.get("api_key_env", "OPENAI_API_KEY")
        auth: dict[str, str] = {}
        if env:
            key = os.environ.get(env)
            if not key:
                raise OptionError("api_key_env", f"the environment variable {env} is not set "
                                  "(api_key_env = \"\" sends no key)")
            auth["Authorization"] = f"Bearer {key}"
        self.auth = HeaderBlock(auth)  # checked once; its repr shows no value
        self.paths = [p.rstrip("/") or p for p in options.get("paths", DEFAULT_PATHS)]
        self.timeouts = Timeouts(connect=float(options.get("connect_timeout_s", 3.0)),
                                 first_byte=float(options.get("first_byte_timeout_s", 600.0)),
                                 idle=float(options.get("idle_timeout_s", 300.0)))
        self.limits = PoolLimits(max_connections=options.get("max_connections", 64))
        self.app = app
        self._pool: Any = None
        limit = options.get("max_upload_bytes", 0)
        for prefix in self.paths:
            app.add_mount(prefix, self.handle, stream_body=True, max_upload_bytes=limit)

    @property
    def pool(self) -> Any:
        """The upstream's pool in the worker's shared client (made at first use)."""
        pool = self._pool
        if pool is None:
            pool = self._pool = self.app.upstream.pool(self.base_url, limits=self.limits,
                                                       timeouts=self.timeouts)
        return pool

    # ------------------------------------------------------------ a request
    def target(self, req: Request) -> bytes | None:
        """The upstream target: base_url's path + the client's path after /v1 +
        its query. None for a path with dot segments (they could climb out of
        the proxied prefix to a path the core serves, with the server's key)."""
        path = req.path
        if any(seg in (".", "..") for seg in path.split("/")):
            return None
        raw_path, sep, query = req.target.partition(b"?")
        if not raw_path.startswith(b"/v1"):  # (absolute-form, or an escaped /v1)
            raw_path = quote(path, safe="/:@!$&'()*+,;=-._~").encode()
        return self.base_path + raw_path[3:] + sep + query

    def headers(self, req: Request) -> HeaderBlock:
        drop = REQUEST_DROP
        conn = req.headers.get("connection")
        if conn:  # fields the client named as per-hop
            drop = drop | {t.strip().lower() for t in conn.split(",")}
        fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.raw_headers
                  if n.decode("latin-1").lower() not in drop]
        return HeaderBlock(fields) + self.auth

    async def handle(self, req: Request) -> Response | StreamingResponse:
        key = req.key
        if key is not None and key.models is not None:
            return _error(403, f"the key '{key.name}' is limited to some models, and "
                          f"{req.path} is passed through unread: it may not be used here",
                          "invalid_request_error", "model_not_allowed")
        target = self.target(req)
        if target is None:
            return _error(400, "dot segments are not allowed in the path",
                          "invalid_request_error", "invalid_path")
        try:
            headers = self.headers(req)
        except ValueError:
            return _error(400, "a header cannot be passed on", "invalid_request_error",
                          "invalid_header")
        body: Any
        length: int | None = None
        if req.streamed:
            body = req.stream()
            cl = req.headers.get("content-length")
            length = int(cl) if cl is not None else None
        else:
            body = req.body if req.body or req.method in ("POST", "PUT", "PATCH") else None
        try:
            resp = await self.pool.request(req.method, target, headers=headers, body=body,
                                           length=length)
        except UpstreamError as e:
            return self.failed(req, e)
        if resp.status == 401 or resp.status == 407:
            resp.close()
            log.error("openai_proxy: %s refused the server's upstream key (%d) for %s %s",
                      resp.origin, resp.status, req.method, req.path)
            return _error(502, "the upstream refused this server's credentials",
                          "upstream_error", "upstream_auth")
        out: dict[str, str] = {}
        for name, value in resp.raw_headers:
            n = name.decode("latin-1").lower()
            if n not in RESPONSE_DROP:
                v = value.decode("latin-1")
                out[n] = f"{out[n]}, {v}" if n in out else v
        ctype = resp.headers.get("content-type") or "application/octet-stream"
        return StreamingResponse(_relay(resp), resp.status, out, ctype)

    def failed(self, req: Request, e: UpstreamError) -> Response:
        log.warning("openai_proxy: %s %s failed upstream: %s", req.method, req.path, e)
        if e.kind is ErrorKind.POOL_TIMEOUT:
            return _error(503, "all upstream connections are busy; try again shortly",
                          "service_unavailable", "upstream_busy", {"Retry-After": "1"})
        if e.timeout:
            return _error(504, "the upstream did not answer in time", "upstream_timeout",
                          "upstream_timeout")
        return _error(502, "the upstream could not be reached or answered badly",
                      "upstream_error", "upstream_unreachable")


async def _relay(resp: Any) -> AsyncIterator[bytes]:
    """The upstream's body as it comes; leaving early (the client went away)
    closes the upstream connection at once."""
    try:
        async for piece in resp:
            yield piece
    finally:
        resp.close()


def setup(app: Any, options: dict[str, Any]) -> None:
    Proxy(app, options)
