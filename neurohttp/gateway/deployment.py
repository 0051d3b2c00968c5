"""One deployment of a public model: an OpenAI-compatible upstream, as the
config describes it ([models.<name>] inline, or one [[models.<name>.deployments]]
table), made ready to send requests: its pool's settings, its path, its header
block with the API key read once from `api_key_env`, and its figures.

The key is read from the environment when the worker builds its models (after
the fork; a reload re-reads it). It lives only in the header block and in
`scrub()`'s reach: it is never in a message, a log line, `repr()`, /stats or
/metrics (tests/test_gateway.py checks all of them).
"""

from __future__ import annotations

import os
from typing import Any

from ..upstream import HeaderBlock, Pool, PoolLimits, Timeouts, UpstreamClient, split_url


class Deployment:
    """model       the public model name
    index       its place in the model's deployment list (0-based)
    upstream    the upstream's own model name (what the body's "model" becomes)
    origin      "scheme://host:port" (what logs and /stats name it by)
    label       "<model>#<index>" , with `origin` its name in /stats
    log_name    "<origin> <upstream>": the access log's `deployment`
    identity    the fingerprint of its table (shared/deployments.py): what its
                router record, figure pair and error counters are found by, so
                they follow it when a reload moves it in the list (set by the provider)
    weight, table  the weight and the whole checked config table (the router's keys)
    key_env     the api_key_env variable ("" when none)
    headers     the HeaderBlock sent with every request; None when api_key_env
                names a variable that is not set (requests then fail with 500)
    """

    __slots__ = ("model", "index", "upstream", "origin", "label", "weight", "table", "key_env",
                 "headers", "target", "timeouts", "limits", "ca_file", "_key", "_client",
                 "_pool", "figures", "identity", "log_name")

    def __init__(self, model: str, index: int, table: dict[str, Any],
                 client: UpstreamClient, environ: Any = None) -> None:
        env = os.environ if environ is None else environ
        self.model = model
        self.index = index
        self.table = table
        self.upstream: str = table["model"] or model
        origin, prefix = split_url(table["base_url"])
        self.origin = str(origin)
        self.label = f"{model}#{index}"
        self.log_name = f"{self.origin} {self.upstream}"
        self.identity = 0
        self.weight: int = table["weight"]
        # "/v1" -> "/v1/chat/completions" (a trailing slash or not)
        self.target = prefix.rstrip("/") + "/chat/completions"
        self.timeouts = Timeouts(connect=table["connect_timeout_s"],
                                 first_byte=table["first_byte_timeout_s"],
                                 idle=table["idle_timeout_s"], total=table["total_timeout_s"])
        self.limits = PoolLimits(max_connections=table["max_connections"])
        self.ca_file: str | None = table["ca_file"] or None
        self.key_env: str = table["api_key_env"]
        key = env.get(self.key_env) if self.key_env else None
        self._key: str | None = key or None
        fields: dict[str, str] = {"Content-Type": "application/json",
                                  "Accept-Encoding": "identity"}  # the body is parsed here
        fields.update(table["headers"])
        if self._key is not None:
            fields["Authorization"] = f"Bearer {self._key}"
        self.headers: HeaderBlock | None = (HeaderBlock(fields)
                                            if self._key is not None or not self.key_env
                                            else None)
        self._client = client
        self._pool: Pool | None = None
        self.figures: Any = None  # set by the provider: its DeploymentFigures

    @property
    def pool(self) -> Pool:
        """This deployment's pool (made on first use, in the worker's loop)."""
        pool = self._pool
        if pool is None:
            pool = self._pool = self._client.pool(self.table["base_url"], limits=self.limits,
                                                  timeouts=self.timeouts, ca_file=self.ca_file)
        return pool

    def scrub(self, text: str) -> str:
        """`text` with the API key (and any Bearer value) blanked: for upstream
        error messages relayed to a client or a log."""
        key = self._key
        if key and key in text:
            text = text.replace(key, "[redacted]")
        return text

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"<Deployment {self.label} {self.origin} model={self.upstream!r}>"
