"""The error log (stderr or a file, with levels) and the access log (JSON lines);
both are reopened on SIGUSR1, so logrotate's create mode works."""

from __future__ import annotations

import logging
import os
import sys
from time import gmtime as _gmtime
from time import monotonic as _monotonic
from time import strftime as _strftime
from time import time as _time
from typing import TYPE_CHECKING, Any

from orjson import dumps as _dumps

if TYPE_CHECKING:
    from .config import Config

FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
_handler: logging.Handler | None = None
_path = "-"


class _ReopenableFileHandler(logging.FileHandler):
    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup(level: str = "info", error_log: str = "-") -> None:
    """Point the "neurohttp" logger at `error_log` with `level`."""
    global _handler, _path
    logger = logging.getLogger("neurohttp")
    # The new file first: if it cannot be opened (OSError), the old log stays.
    if error_log in ("-", ""):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(error_log)), exist_ok=True)
        handler = _ReopenableFileHandler(error_log, encoding="utf-8")
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    _handler, _path = handler, error_log


def setup_from(cfg: Config) -> None:
    """setup() with a config's [log]; a file that cannot be opened is a
    ConfigError naming the key and the config file."""
    from .config import ConfigError
    try:
        setup(cfg.log.level, cfg.log.error_log)
    except OSError as e:
        raise ConfigError(f"{cfg.path or '<defaults>'}: log.error_log: cannot open "
                          f"{cfg.log.error_log!r}: {e.strerror}") from None


def reopen() -> None:
    """Reopen the log file (after logrotate moved it)."""
    if isinstance(_handler, _ReopenableFileHandler):
        _handler.reopen()


class Every:
    """Lets a repeated log message through at most once per `interval` seconds
    (EMFILE, a full worker) and counts the ones held back meanwhile."""

    __slots__ = ("interval", "last", "held")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.last = -interval
        self.held = 0

    def due(self) -> int | None:
        """None: stay quiet; else the number of messages held back since the last one."""
        now = _monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return None
        self.last = now
        held, self.held = self.held, 0
        return held


_MILLIS = [f".{i:03d}Z" for i in range(1000)]  # the end of the time field, by millisecond


class AccessLog:
    """One JSON line per request, written by orjson into a buffer that the
    worker flushes every tick (and at exit, and when it grows large), so a
    request costs a dict and a dumps, never a system call.

    The file is opened O_APPEND and each flush is one write(): lines from
    several workers never interleave.
    """

    __slots__ = ("path", "fd", "buf", "_sec", "_prefix")

    FLUSH_AT = 256  # lines; bounds the buffer under heavy load

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.buf: list[bytes] = []
        self._sec = -1
        self._prefix = ""
        self._open()

    def _open(self) -> None:
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def record(self, req: Any, status: int, nbytes: int, t0: float) -> None:
        """Log one answered request; `req` is None for input refused before a
        request could be parsed (400, 408, ...)."""
        now = _time()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._prefix = _strftime("%Y-%m-%dT%H:%M:%S", _gmtime(sec))
        if req is not None:
            # The raw target (path and query, as sent), not req.path: that one is
            # computed on first use, which costs more than the rest of this line.
            # A generation's usage event (context.UsageSink puts it on the request
            # when it ends, whether this log is on or not): model and tokens.
            usage = getattr(req, "usage", None)
            line = {"time": self._prefix + _MILLIS[int((now - sec) * 1000)],
                    "client": req.client, "method": req.method,
                    "path": req.target.decode("latin-1"), "status": status, "bytes": nbytes,
                    "duration": int((_monotonic() - t0) * 1e6) / 1000,
                    "model": usage.model if usage is not None else None,
                    "tokens": usage.prompt_tokens + usage.completion_tokens
                    if usage is not None else None}
            if usage is not None:
                line["prompt_tokens"] = usage.prompt_tokens
                line["completion_tokens"] = usage.completion_tokens
                line["deployment"] = usage.deployment
            else:
                line["prompt_tokens"] = line["completion_tokens"] = line["deployment"] = None
        else:
            line = {"time": self._prefix + _MILLIS[int((now - sec) * 1000)],
                    "client": None, "method": None, "path": None, "status": status,
                    "bytes": nbytes, "duration": int((_monotonic() - t0) * 1e6) / 1000,
                    "model": None, "tokens": None, "prompt_tokens": None,
                    "completion_tokens": None, "deployment": None}
        # the API key's name (never the key), when the request was admitted with one
        key = getattr(req, "key", None)
        line["key"] = key.name if key is not None else None
        if req is not None and usage is not None and usage.cached:
            line["cache"] = "hit"  # answered from the response cache; tokens as charged
        buf = self.buf
        buf.append(_dumps(line))
        if len(buf) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self.buf or self.fd < 0:
            return
        data = b"\n".join(self.buf) + b"\n"
        self.buf.clear()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                logging.getLogger("neurohttp").exception("access log write failed")
                return
            view = view[n:]

    def reopen(self) -> None:
        """After logrotate moved the file: flush to the old one, open a new one."""
        self.flush()
        self.close()
        self._open()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
