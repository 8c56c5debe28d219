"""Structured logs: one JSON object per line on stderr, with the request id of the request being served.

The request id lives in a context variable set by the request middleware, so any log line written
while serving a request (ours, uvicorn's, onnxruntime wrappers') carries it without being passed around.
"""
from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson

from .settings import SETTINGS

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "pid", "request_id"?, **extra, "exc"?}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage(), "pid": record.process}
        rid = request_id_var.get()
        if rid is not None:
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_") and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def uvicorn_log_config(level: str | None = None) -> dict:
    """A logging dictConfig for uvicorn.run(log_config=...): everything as JSON lines on stderr."""
    level = (level or SETTINGS.log_level).upper()
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": "api.logging_setup.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "": {"handlers": ["stderr"], "level": level},
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},  # we log requests ourselves
        },
    }


def setup_logging(level: str | None = None) -> None:
    """Make the root logger and uvicorn's loggers write JSON lines (idempotent). Called at app import,
    so `uvicorn api.app:app` gets JSON logs too, not only `gcodefp serve`."""
    level = (level or SETTINGS.log_level).upper()
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = [], True
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate = [], False
