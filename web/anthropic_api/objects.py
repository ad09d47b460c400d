"""Jobs presented as Anthropic objects: the `message`, its stream events, and the error envelope.

A message id is its job id with `msg_` for `job_` (`msg_X` is job `job_X`), so a message can be read or
canceled through /v1/jobs.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_deploy.job_records import JOB_ID_PREFIX
from web.openai_api.objects import first_choice

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
    if reason != "max_tokens" and first_choice(job).get("tool_calls"):
        return "tool_use", None
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


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped call as a tool_use block (arguments that are no JSON object: `{}`)."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        arguments = {}
    return {
        "type": "tool_use",
        "id": call["id"],
        "name": call["function"]["name"],
        "input": arguments if isinstance(arguments, dict) else {},
    }


def thinking(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": ""}


def content_blocks(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A thinking block (when the sample reasoned), a text block (unless the sample only called tools),
    then a tool_use block per call."""
    choice = first_choice(job)
    calls = choice.get("tool_calls") or []
    blocks = [thinking(choice["reasoning_content"])] if choice.get("reasoning_content") else []
    text = choice.get("content", choice["text"]) or ""
    if text or not calls:
        blocks.append({"type": "text", "text": text})
    return blocks + [tool_use(c) for c in calls]


def message(job: dict[str, Any], model: str, stops: list[str]) -> dict[str, Any]:
    """The `message` object of a finished job."""
    reason, sequence = stop_reason(job, stops)
    return {
        "id": message_id(job["id"]),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(job),
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


class Blocks:
    """The content blocks of a streamed message, opened one after another (each closes the one before)."""

    DELTAS = {"text": ("text_delta", "text"), "thinking": ("thinking_delta", "thinking")}

    def __init__(self) -> None:
        self.index, self.kind = -1, ""

    def delta(self, kind: str, text: str) -> str:
        """A text or thinking delta, opening a block of that kind first when the open one is another."""
        opened = self.open(kind, {"type": kind, kind: ""}) if kind != self.kind else ""
        name, field = self.DELTAS[kind]
        return opened + event("content_block_delta", {"index": self.index, "delta": {"type": name, field: text}})

    def open(self, kind: str, block: dict[str, Any]) -> str:
        closed = self.close()
        self.index, self.kind = self.index + 1, kind
        return closed + event("content_block_start", {"index": self.index, "content_block": block})

    def close(self) -> str:
        if not self.kind:
            return ""
        self.kind = ""
        return event("content_block_stop", {"index": self.index})

    def tool_use(self, call: dict[str, Any]) -> str:
        """A tool_use block: started with an empty input, its JSON in one input_json_delta, stopped."""
        block = {**tool_use(call), "input": {}}
        partial = json.dumps(tool_use(call)["input"], ensure_ascii=False)
        delta = {"index": self.index + 1, "delta": {"type": "input_json_delta", "partial_json": partial}}
        return self.open("tool_use", block) + event("content_block_delta", delta) + self.close()


def message_end(job: dict[str, Any], stops: list[str], blocks: Blocks) -> str:
    """The last block's content_block_stop (an empty text block when there was none), message_delta (stop
    reason, final usage with the input tokens) and message_stop."""
    reason, sequence = stop_reason(job, stops)
    empty = blocks.open("text", {"type": "text", "text": ""}) if blocks.index < 0 else ""
    return (
        empty
        + blocks.close()
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
