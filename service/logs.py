"""Logging for the workers: text or JSON lines, every line of a request tagged with its request id.

The request id comes from ``RequestMetricsMiddleware`` (the caller's ``X-Request-Id`` or a new
one); the middleware puts it in ``request_id_var`` for the request's task and writes one access
line per request on the ``splitvl.access`` logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("splitvl_request_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName", "color_message"}  # color_message: uvicorn's ANSI copy of the message


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (None outside a request) so both formats can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class UvicornNameFilter(logging.Filter):
    """uvicorn writes its start-up and shutdown lines on a logger named ``uvicorn.error``: shown as
    ``uvicorn``, so that "Uvicorn running on …" does not read as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, and any ``extra=`` fields;
    with ``show_pid`` also the process id (several worker processes share one log stream)."""

    def __init__(self, show_pid: bool = False) -> None:
        super().__init__()
        self.show_pid = show_pid

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.show_pid:
            out["pid"] = record.process
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, show_pid: bool = False) -> None:
        pid = "[%(process)d]" if show_pid else ""
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{pid}: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid and record.name != "splitvl.access" else line


def configure_logging(level: str = "info", fmt: str = "text", *, show_pid: bool = False) -> None:
    """Root handler on stderr in ``fmt`` ("text" or "json"); uvicorn's loggers propagate to it.
    ``show_pid`` tags every line with its process id (``serve vision --workers N``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(show_pid) if fmt == "json" else TextFormatter(show_pid))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(UvicornNameFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
