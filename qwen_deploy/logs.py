"""Logging: one line per job lifecycle event (`event()`), as text or JSON (`log_format: json`).

Lines carry ids, queues, token counts and timings; prompt text only at DEBUG, secrets never.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

EVENT_ATTR = "qd_fields"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `name k=v ...` (text) or `{"event": name, ...}` (JSON)."""
    if logger.isEnabledFor(level):
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        logger.log(level, "%s %s", name, text, extra={EVENT_ATTR: {"event": name, **fields}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, EVENT_ATTR, None)
        if fields:
            data.update(fields)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(log_format: str, level: str, logger: logging.Logger | None = None) -> None:
    """Set the level, and the JSON formatter on every handler of `logger` (the root by default)."""
    target = logger or logging.getLogger()
    target.setLevel(level)
    if log_format != "json":
        return
    if not target.handlers:
        target.addHandler(logging.StreamHandler())
    for handler in target.handlers:
        handler.setFormatter(JsonFormatter())
