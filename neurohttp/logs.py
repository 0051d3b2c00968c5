"""The error log: stderr ("-") or a file, reopened on SIGUSR1 (logrotate's create mode)."""

from __future__ import annotations

import logging
import os
import sys

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
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
    if error_log in ("-", ""):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(error_log)), exist_ok=True)
        handler = _ReopenableFileHandler(error_log, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    _handler, _path = handler, error_log


def reopen() -> None:
    """Reopen the log file (after logrotate moved it)."""
    if isinstance(_handler, _ReopenableFileHandler):
        _handler.reopen()
