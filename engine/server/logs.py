"""Structured logs: one JSON object per line, every request line carrying its request id."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LOGGER = "engine.server"


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, event, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", stream: TextIO | None = None) -> logging.Logger:
    """Send the server's logs to ``stream`` (stderr) as JSON lines; return the logger."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def log(event: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (request_id, model, status, ...)."""
    logger = logging.getLogger(LOGGER)
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)


def elapsed_ms(start: float) -> float:
    """Milliseconds since ``start`` (a time.perf_counter value), rounded for logs."""
    return round((time.perf_counter() - start) * 1000, 3)
