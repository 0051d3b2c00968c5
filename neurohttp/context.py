"""What handlers and the AI pipeline may use of their worker: one frozen
`Services` object, built by the composition root (worker/worker.py).

Handlers and the pipeline never see the `Worker`: they get the settings they
need, the model registry, a typed writer of the stats slot (`Counters`), the
per-second `Meter`, a reader of the whole block (`StatsReader`), a clock, and
the usage sink every generation reports to (`UsageSink`). The import layers
are `protocol <- messages <- context <- ai, handlers <- worker` (docs/ARCHITECTURE.md):
this module imports nothing above `messages` but the stats block's own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .messages import Request
from .stats import layout as L
from .stats.block import StatsBlock
from .stats.snapshot import Snapshot, stats_document
from .stats.window import Meter

_S_TOKENS_IN, _S_TOKENS_OUT = L.S_TOKENS_IN, L.S_TOKENS_OUT


# ---------------------------------------------------------------- small interfaces
class Clock(Protocol):
    """The worker's wall clock as of its last tick (twice a second): the same
    second as the Date header (protocol/serialize.py's clock is one)."""

    second: int


class ModelLookup(Protocol):
    """The model registry (ai/models.py) as handlers and the pipeline use it."""

    max_output_tokens: dict[str, int]

    def get(self, name: str | None) -> tuple[str, Any]: ...

    def names(self) -> list[str]: ...

    def provider_name(self, model: str) -> str: ...


class WebSocketPeer(Protocol):
    """What a WebSocket session may do with its connection (worker/websocket.py
    implements it): send text messages, wait while the client reads slowly."""

    @property
    def open(self) -> bool: ...

    write_paused: bool

    def send_text(self, text: str) -> None: ...

    async def drain(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """The part of the config handlers and the pipeline act on."""

    sse_ping_s: float = 15.0        # [server] sse_ping_s: idle SSE streams get ": ping"
    stats_allow: tuple[str, ...] = ()  # [stats] allow: who may read /stats, /metrics, /dashboard
    cache_max_entries: int = 1024      # [cache]: the response cache's bounds, per worker
    cache_max_bytes: int = 16 << 20


PLUGIN_MODULE_PREFIX = "neurohttp_plugin_"  # how plugins/<name>.py is imported


def plugin_of(obj: Any) -> str | None:
    """The plugin that registered `obj` (a hook, a filter, a provider or its
    instance), for log lines: the App tags what a plugin registers, else the
    module a plugin was loaded as names it. None: not a plugin's."""
    owner = getattr(obj, "__neurohttp_plugin__", None)
    if owner:
        return str(owner)
    mod = getattr(obj, "__module__", None) or type(obj).__module__ or ""
    return mod[len(PLUGIN_MODULE_PREFIX):] if mod.startswith(PLUGIN_MODULE_PREFIX) else None


# ---------------------------------------------------------------- the stats slot
class Counters:
    """The typed writer of this worker's stats slot and per-model figures, for
    handlers and the pipeline (the connection counts requests and bytes itself).
    Only this worker writes its slot, so these are plain adds."""

    __slots__ = ("slot", "meter")

    def __init__(self, slot: Any, meter: Meter | None) -> None:
        self.slot = slot
        self.meter = meter

    def tokens(self, model: str, tokens_in: int = 0, tokens_out: int = 0) -> None:
        """Tokens used now (since-start totals and the model's figures of this second)."""
        s = self.slot
        if tokens_in:
            s[_S_TOKENS_IN] += tokens_in
        if tokens_out:
            s[_S_TOKENS_OUT] += tokens_out
        if self.meter is not None:
            self.meter.tokens(model, tokens_in, tokens_out)

    def instant(self, model: str, tokens_in: int, tokens_out: int) -> None:
        """A request answered at once: its tokens, and one request of the model
        with no model time."""
        s = self.slot
        s[_S_TOKENS_IN] += tokens_in
        s[_S_TOKENS_OUT] += tokens_out
        meter = self.meter
        if meter is not None:
            meter.model_instant(model, tokens_in, tokens_out)

    def stream_started(self) -> None:
        s = self.slot
        s[L.S_STREAMS] += 1
        s[L.S_STREAMS_ACTIVE] += 1

    def stream_ended(self, cancelled: bool) -> None:
        s = self.slot
        s[L.S_STREAMS_ACTIVE] -= 1
        if cancelled:
            s[L.S_STREAMS_CANCELLED] += 1


class StatsReader:
    """Reads the whole block (every worker's slot) for /stats, /metrics, /health."""

    __slots__ = ("block", "route_names", "model_names", "sections", "metric_texts")

    def __init__(self, block: StatsBlock, route_names: list[str],
                 model_names: list[str]) -> None:
        self.block = block
        self.route_names = route_names  # the App's live list: plugins add routes later
        self.model_names = model_names
        # More /stats sections from parts the handlers do not know (the security
        # gate's per-key figures, the firewall's): name -> a reader of its document.
        self.sections: dict[str, Callable[[], dict[str, Any]]] = {}
        # More /metrics text from those parts (the plugins' figures): each gets
        # the /stats document and returns Prometheus lines.
        self.metric_texts: list[Callable[[dict[str, Any]], str]] = []

    def add_section(self, name: str, read: Callable[[], dict[str, Any]]) -> None:
        self.sections[name] = read

    def document(self, snap: Snapshot) -> dict[str, Any]:
        """The /stats document of `snap` with the added sections."""
        doc = stats_document(snap)
        for name, read in self.sections.items():
            doc[name] = read()
        return doc

    def started(self) -> int:
        """Unix second the master started."""
        return int(self.block.words[L.H_STARTED])

    def workers(self) -> int:
        """Live workers, as the master keeps the count."""
        return int(self.block.words[L.H_WORKERS])

    def snapshot(self) -> Snapshot:
        return Snapshot(self.block, self.route_names, self.model_names)

    def interval(self, start: int, end: int) -> dict[str, Any]:
        """The /stats document whose windowed figures ("window", each route's and
        model's "window") cover the closed seconds start .. end-1 (at most the
        last minute: the per-second ring's length)."""
        snap = Snapshot(self.block, self.route_names, self.model_names, now=end, since=start)
        return self.document(snap)


# ---------------------------------------------------------------- usage
# How a generation ended (UsageEvent.outcome).
FINISHED = "finished"    # the model's answer ended (stop, tool_calls, content_filter)
LENGTH = "length"        # cut by max_tokens
CANCELLED = "cancelled"  # the client went away, or the server cut the stream at shutdown
FAILED = "failed"        # the provider failed (UsageEvent.error names the kind)


@dataclass(frozen=True, slots=True, eq=False)
class UsageEvent:
    """One generation, reported once however it ended (UsageSink.report).
    Compared and hashed by identity: an answer made at once reuses its event."""

    model: str                   # the public model name
    key: str | None              # the API key's name (None: no [auth] key)
    prompt_tokens: int
    completion_tokens: int       # equal to `usage` in the response, and to what was charged
    latency: float               # seconds from the start to the end of the generation
    ttft: float | None           # seconds to the first output (None: none came)
    outcome: str                 # FINISHED, LENGTH, CANCELLED or FAILED
    finish_reason: str | None = None
    error: str | None = None     # the failure's kind (ai/providers: ProviderError.kind)
    stream: bool = False
    cached: bool = False         # answered from the response cache (ai/cache.py)
    deployment: str | None = None  # the upstream that answered ("origin model"; gateway models)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Draft:
    """A UsageEvent's slots, plainly writable: usage_event() fills one, then
    makes it a UsageEvent (the same layout). A frozen dataclass's __init__
    stores each field through object.__setattr__, ~1,500 instructions a field
    (~17k an event, callgrind); this is ~3.8k."""

    __slots__ = UsageEvent.__slots__  # (the dataclass's fields, in order)


def usage_event(model: str, key: str | None, prompt_tokens: int, completion_tokens: int,
                latency: float, ttft: float | None, outcome: str,
                finish_reason: str | None = None, error: str | None = None,
                stream: bool = False, cached: bool = False,
                deployment: str | None = None) -> UsageEvent:
    """UsageEvent(...), made cheaply (each generation makes one): the same
    frozen dataclass instance."""
    ev: Any = _Draft()
    ev.model = model
    ev.key = key
    ev.prompt_tokens = prompt_tokens
    ev.completion_tokens = completion_tokens
    ev.latency = latency
    ev.ttft = ttft
    ev.outcome = outcome
    ev.finish_reason = finish_reason
    ev.error = error
    ev.stream = stream
    ev.cached = cached
    ev.deployment = deployment
    ev.__class__ = UsageEvent
    return ev


class UsageSubscriber(Protocol):
    """A reader of the usage sink (quotas, plugins). Both calls run on the
    request path: keep them cheap, never block."""

    def charge(self, model: str, key: str | None, prompt_tokens: int,
               completion_tokens: int) -> None:
        """Tokens used now: the prompt at the start, completion tokens as they stream."""

    def report(self, event: UsageEvent, request: Request | None) -> None:
        """The generation ended (once)."""


class UsageSink:
    """Where every generation's tokens go as they are used (`charge`) and where it
    reports once when it ends (`report`). The stats are written here first (the
    slot's totals and the model's figures); then each subscriber is told; the
    event is put on the request (`request.usage`) for the access log line and
    the after_response hooks, whatever else is on."""

    __slots__ = ("counters", "subscribers", "_slot", "_meter")

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._slot = counters.slot    # (the hot path writes these itself: see instant)
        self._meter = counters.meter
        self.subscribers: list[UsageSubscriber] = []

    def subscribe(self, subscriber: UsageSubscriber) -> None:
        self.subscribers.append(subscriber)

    def charge(self, model: str, key: str | None, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
        self.counters.tokens(model, prompt_tokens, completion_tokens)
        for sub in self.subscribers:
            sub.charge(model, key, prompt_tokens, completion_tokens)

    def report(self, event: UsageEvent, request: Request | None, started: float,
               owed: tuple[int, int] | None = None) -> None:
        """`started`: the generation's time.monotonic() at its start (the model's
        latency histogram reads the clock itself). `owed`: (prompt, completion)
        tokens not charged yet, charged here first, as charge() would: a
        provider that reports usage is charged at its end, and the tokens and
        the finished request are then one write of the model's figures."""
        meter = self._meter
        if owed is None:
            if meter is not None:
                meter.model_request(event.model, started, error=event.outcome == FAILED)
        else:
            tin, tout = owed
            s = self._slot
            if tin:
                s[_S_TOKENS_IN] += tin
            if tout:
                s[_S_TOKENS_OUT] += tout
            if meter is not None:
                meter.model_request(event.model, started, tin, tout, event.outcome == FAILED)
            for sub in self.subscribers:
                sub.charge(event.model, event.key, tin, tout)
        if request is not None:
            request.usage = event
        for sub in self.subscribers:
            sub.report(event, request)

    def instant(self, event: UsageEvent, request: Request | None) -> None:
        """charge + report of an answer the provider gave at once (the hot path:
        the event is made once per distinct answer, see Pipeline.instant)."""
        # Counters.instant, inlined: this runs for every answer made at once
        s = self._slot
        s[_S_TOKENS_IN] += event.prompt_tokens
        s[_S_TOKENS_OUT] += event.completion_tokens
        meter = self._meter
        if meter is not None:
            meter.model_instant(event.model, event.prompt_tokens, event.completion_tokens)
        if request is not None:
            request.usage = event
        if self.subscribers:
            for sub in self.subscribers:
                sub.charge(event.model, event.key, event.prompt_tokens, event.completion_tokens)
                sub.report(event, request)


# ---------------------------------------------------------------- the services
@dataclass(frozen=True, slots=True)
class Services:
    """Everything handlers and the pipeline use of their worker."""

    settings: Settings
    models: ModelLookup
    counters: Counters
    meter: Meter | None
    stats: StatsReader
    clock: Clock
    usage: UsageSink
    # the plugins' on_token filters: the App's live list (plugins add to it at load)
    filters: list[Callable[[Any, str], str | None]]
