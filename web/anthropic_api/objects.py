"""Jobs presented as Anthropic objects: the `message`, its stream events, and the error envelope.

A message id is its job id with `msg_` for `job_` (`msg_X` is job `job_X`), so a message can be read or
canceled through /v1/jobs.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_deploy.job_records import JOB_ID_PREFIX

MESSAGE_ID_PREFIX = "msg_"

# Job finish reasons → Anthropic's stop_reason: a text cut off (token cap, time budget, cancel) is max_tokens.
STOP_REASONS = {"eos": "end_turn", "stop": "stop_sequence"}

# HTTP status of the project's error → (Anthropic's status, error type). Validation (422) and a wrong
# content type (415) are Anthropic's 400; no capacity (503) is its 529 overloaded_error.
ERROR_TYPES = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    410: (404, "not_found_error"),
    413: (413, "request_too_large"),
    415: (400, "invalid_request_error"),
    422: (400, "invalid_request_error"),
    429: (429, "rate_limit_error"),
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
}


def message_id(job_id: str) -> str:
    return MESSAGE_ID_PREFIX + job_id.removeprefix(JOB_ID_PREFIX)


def stop_reason(job: dict[str, Any], stops: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished job; the sequence is the stop string found first after
    the text (the text ends where it starts), or the only one given."""
    output = job.get("output") or {}
    reason = STOP_REASONS.get(output.get("finish_reason") or "", "max_tokens")
    if reason != "stop_sequence":
        return reason, None
    matched = output.get("stop_sequence")
    if matched is None and len(stops) == 1:
        matched = stops[0]
    if matched is None:  # several were given and the job does not say which: a plain end
        return "end_turn", None
    return reason, matched


def usage(job: dict[str, Any]) -> dict[str, Any]:
    raw = (job.get("output") or {}).get("usage") or {}
    return {
        "input_tokens": int(raw.get("prompt_tokens") or 0),
        "output_tokens": int(raw.get("completion_tokens") or 0),
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
    }


def message(job: dict[str, Any], model: str, stops: list[str]) -> dict[str, Any]:
    """The `message` object of a finished job (one text block)."""
    reason, sequence = stop_reason(job, stops)
    return {
        "id": message_id(job["id"]),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": (job.get("output") or {}).get("text", "")}],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(job),
    }


def event(name: str, data: dict[str, Any]) -> str:
    """One server-sent event, named as Anthropic names it (`data.type` is the same name)."""
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


def message_start(job: dict[str, Any], model: str) -> str:
    started: dict[str, Any] = {
        "id": message_id(job["id"]),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage(job), "output_tokens": 0},
    }
    return event("message_start", {"message": started})


def text_delta(text: str) -> str:
    return event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


def message_end(job: dict[str, Any], stops: list[str]) -> str:
    """content_block_stop, message_delta (stop reason, final usage with the input tokens) and message_stop."""
    reason, sequence = stop_reason(job, stops)
    return (
        event("content_block_stop", {"index": 0})
        + event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage(job)})
        + event("message_stop", {})
    )


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def envelope(status: int, body: Any) -> tuple[int, dict[str, Any]] | None:
    """The project's error body `{"error": {type, code, message, param}}` as Anthropic's, with its status;
    None for a body of another shape."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict) or "type" in body:
        return None
    error = body["error"]
    code, kind = ERROR_TYPES.get(status, (status, "api_error" if status >= 500 else "invalid_request_error"))
    message = str(error.get("message") or "")
    param = error.get("param")
    if param and param not in message:
        message = f"{param}: {message}"
    return code, error_body(kind, message)
