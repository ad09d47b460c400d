"""Lifecycle options of a submitted job: its priority and its deadline.

- `priority`: "high" | "normal" | "low" in a `/v1/jobs` body; OpenAI's `service_tier` on the OpenAI
  routes ("priority" → high, "default"/"auto" → normal, "flex" → low). The engine's pending set is
  scored by priority rank * 1e10 + submit time, so a claim takes high before normal before low, FIFO
  within. Bulk (batch) work stays below all of it (its own queue and engine class).
- Deadline: `Cancel-After` header (Replicate's durations: `30s`, `5m`, `1h30m`, `1.5s`, `250ms` or plain
  seconds) and/or `deadline_seconds` in the body (the earlier wins), from 0 (exclusive) to 24 h.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from flask import has_request_context, request

from qwen_deploy.errors import BadRequest
from qwen_deploy.lifecycle import MAX_DEADLINE_SECONDS

DURATION = re.compile(
    r"(?:([0-9]{1,6})h)?(?:([0-9]{1,6})m(?!s))?(?:([0-9]{1,9}(?:\.[0-9]{1,6})?)s)?"
    r"(?:([0-9]{1,9})ms)?"
)
PLAIN = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")
SERVICE_TIERS = {"priority": "high", "default": "normal", "auto": "normal", "flex": "low"}


@dataclass(frozen=True)
class JobOptions:
    priority: str = "normal"
    deadline_seconds: float | None = None  # relative to submit

    def deadline(self) -> float | None:
        return None if self.deadline_seconds is None else time.time() + self.deadline_seconds

    def fields(self) -> dict[str, str]:
        """Extra record fields (kept so a retry can ask for the same)."""
        return {} if self.deadline_seconds is None else {"deadline_seconds": repr(self.deadline_seconds)}


def parse_duration(raw: str, param: str = "Cancel-After") -> float:
    """Seconds in a `Cancel-After` value; 400 `invalid_value` naming `param` otherwise."""
    value = raw.strip()
    seconds: float | None = None
    if PLAIN.fullmatch(value):
        seconds = float(value)
    else:
        match = DURATION.fullmatch(value)
        if match and value:
            h, m, s, ms = match.groups()
            seconds = int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0) + int(ms or 0) / 1000
    if seconds is None:
        raise BadRequest(
            f"{param} must be a duration like 30s, 5m, 1h30m or a number of seconds, got {raw[:40]!r}",
            code="invalid_value",
            param=param,
        )
    return check_deadline(seconds, param)


def check_deadline(seconds: float, param: str) -> float:
    if not 0 < seconds <= MAX_DEADLINE_SECONDS:
        raise BadRequest(
            f"{param} must be more than 0 and at most {MAX_DEADLINE_SECONDS:g} seconds",
            code="invalid_value",
            param=param,
        )
    return seconds


def job_options(priority: str | None = None, deadline_seconds: float | None = None) -> JobOptions:
    """The options of the request in progress: the body's values and the `Cancel-After` header."""
    deadlines = [] if deadline_seconds is None else [check_deadline(float(deadline_seconds), "deadline_seconds")]
    header = request.environ.get("HTTP_CANCEL_AFTER") if has_request_context() else None
    if header is not None:
        deadlines.append(parse_duration(header))
    return JobOptions(priority or "normal", min(deadlines) if deadlines else None)


def body_options(body: Any) -> JobOptions:
    """Options of a validated `/v1/jobs` body."""
    return job_options(body.get("priority"), body.get("deadline_seconds"))


def service_tier_options(body: Any) -> JobOptions:
    """Options of an OpenAI body: `service_tier` mapped to a priority (400 for another value)."""
    tier = body.get("service_tier") if isinstance(body, dict) else None
    if tier is not None and tier not in SERVICE_TIERS:
        raise BadRequest(
            f"service_tier must be one of {', '.join(SERVICE_TIERS)}", code="invalid_value", param="service_tier"
        )
    return job_options(SERVICE_TIERS[tier] if tier is not None else None)
