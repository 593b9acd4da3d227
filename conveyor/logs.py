"""One log format for every process (gateway, workers, ``conveyor up``): UTC timestamps, level, logger, and the
request id and model of the request a line is about. ``CONVEYOR_LOG_FORMAT=json`` (or ``--log-format json``) writes
one JSON object per line instead, for log collectors. Prompt text is never logged."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

FORMAT_VARIABLE = "CONVEYOR_LOG_FORMAT"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("model", default=None)


@contextmanager
def about(request_id: str, model: str | None) -> Iterator[None]:
    """Every line logged inside (and in tasks started inside) names this request and model."""
    tokens = _request_id.set(request_id), _model.set(model)
    try:
        yield
    finally:
        _request_id.reset(tokens[0])
        _model.reset(tokens[1])


def tag(request_id: str, model: str | None) -> None:
    """Name the request for the rest of the current task (a request handler's own task)."""
    _request_id.set(request_id)
    _model.set(model)


def current_request() -> str | None:
    """The id of the request the current task works for, if any."""
    return _request_id.get()


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        record.model = _model.get()
        return True


def _stamp(record: logging.LogRecord) -> str:
    """The record's time in UTC, to the millisecond (``2026-11-23T22:28:16.123Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = _stamp(record)
        context = ""
        request_id = getattr(record, "request_id", None)
        if request_id:
            context = f" request_id={request_id} model={getattr(record, 'model', None)}"
        line = f"{stamp} {record.levelname} {record.name}{context}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _stamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
            entry["model"] = getattr(record, "model", None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger (uvicorn's and vLLM's loggers are routed through it too)."""
    fmt = fmt or os.environ.get(FORMAT_VARIABLE, "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_Context())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "vllm"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
