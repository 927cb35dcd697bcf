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

# Characters that end a line or rewrite a terminal: C0 and C1 controls, DEL and the Unicode line and
# paragraph separators. A request path (``%0A`` decodes to a newline) or a header may carry any of them.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_TEXT_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
# JSON escapes C0 itself; these are the ones json.dumps(ensure_ascii=False) leaves raw
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _CONTROLS if c >= 0x7F}


def escape(text: str) -> str:
    """``text`` on one line: every control or line-breaking character as a ``\\xNN`` / ``\\uNNNN`` escape."""
    return text.translate(_TEXT_ESCAPES)


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
        return json.dumps(out, default=str, ensure_ascii=False).translate(_JSON_ESCAPES)


class TextFormatter(logging.Formatter):
    def __init__(self, show_pid: bool = False) -> None:
        pid = "[%(process)d]" if show_pid else ""
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{pid}: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """One line whatever the message holds: what a client sent (a path, a header) cannot forge another."""
        line = escape(super().formatMessage(record))
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={escape(rid)}]" if rid and record.name != "splitvl.access" else line

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        # a traceback spans lines: each is indented, so none (an exception's message) passes for a log line
        return "\n".join("  " + escape(line) for line in super().formatException(ei).splitlines())


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
