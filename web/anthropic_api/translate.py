"""Anthropic Messages bodies → job requests (the dict `POST /v1/jobs` stores), with 400s naming the parameter.

Text only: `system` and message content as strings or text blocks. A trailing assistant message is a
prefill the model continues (the job's `continue_final_message`). Absent sampling fields keep the job
defaults (greedy), as on the OpenAI routes; `temperature` takes Anthropic's 0 to 1.
"""

from __future__ import annotations

from typing import Any

from qwen_deploy.config import Settings
from qwen_deploy.errors import AppError, BadRequest
from web.schemas import parse_job, public_id

# Fields of a request that become job fields (request name → job name).
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "stop_sequences": "stop"}
# Accepted and without effect on the text: request metadata (Anthropic keeps it for abuse tracking) and
# the capacity tier.
IGNORED = frozenset({"metadata", "service_tier"})
MESSAGE_KEYS = frozenset({"model", "messages", "system", "max_tokens", "stream", *SAMPLING, *IGNORED})
# Keys of a text block besides type and text: prompt-caching and citation hints, which change no text.
BLOCK_HINTS = frozenset({"cache_control", "citations"})
SERVICE_TIERS = ("auto", "standard_only")


def unsupported(param: str, why: str = "is not supported by this server") -> BadRequest:
    return BadRequest(f"{param}: {why}", code="unsupported_parameter", param=param)


def invalid(param: str, message: str) -> BadRequest:
    return BadRequest(f"{param}: {message}", code="invalid_value", param=param)


def text_of(content: Any, where: str) -> str:
    """A string, or the joined text of a list of text blocks; any other block is a 400 naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, "must be a string or a list of text blocks")
    parts = []
    for i, block in enumerate(content):
        at = f"{where}.{i}"
        if not isinstance(block, dict):
            raise invalid(at, 'must be a content block like {"type": "text", "text": "..."}')
        kind = block.get("type")
        if kind != "text":
            raise unsupported(f"{at}.type", f"{kind!r} content blocks are not supported (text only)")
        if not isinstance(block.get("text"), str):
            raise invalid(f"{at}.text", "must be a string")
        for key in block:
            if key not in ("type", "text") and key not in BLOCK_HINTS:
                raise unsupported(f"{at}.{key}")
        parts.append(block["text"])
    return "".join(parts)


def chat(body: dict[str, Any]) -> tuple[list[dict[str, str]], bool]:
    """The job's chat messages (system first) and whether the last one is an assistant prefill."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("messages", "must be a non-empty list of messages")
    out: list[dict[str, str]] = []
    system = body.get("system")
    if system is not None:
        text = text_of(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    for i, msg in enumerate(raw):
        at = f"messages.{i}"
        if not isinstance(msg, dict):
            raise invalid(at, "must be an object with role and content")
        for key in msg:
            if key not in ("role", "content"):
                raise unsupported(f"{at}.{key}")
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"{at}.role", "must be user or assistant")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise invalid(f"{at}.role", f"messages must alternate user and assistant, starting with user: {expected}")
        out.append({"role": role, "content": text_of(msg.get("content"), f"{at}.content")})
    prefill = out[-1]["role"] == "assistant"
    if prefill and not out[-1]["content"]:
        out.pop()  # an empty prefill: the model starts its turn as usual
        prefill = False
    if prefill and out[-1]["content"] != out[-1]["content"].rstrip():
        raise invalid(f"messages.{len(raw) - 1}.content", "final assistant content cannot end with trailing whitespace")
    return out, prefill


def _check(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_type")
    for key in body:
        if key not in MESSAGE_KEYS:
            raise unsupported(key)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("metadata", "must be an object")
    tier = body.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise invalid("service_tier", f"must be one of {', '.join(SERVICE_TIERS)}")
    if body.get("stream") not in (None, True, False):
        raise invalid("stream", "must be a boolean")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "Field required (a model id from GET /v1/models)")
    return body


def _renamed(err: AppError) -> BadRequest:
    """A job-schema error (422) as a 400 naming the request's parameter."""
    param = err.param or ""
    head = param.split(".", 1)[0]
    names = {"max_new_tokens": "max_tokens", "stop": "stop_sequences"}
    message = err.message
    if head in names:
        param = names[head] + param[len(head) :]
        message = message.replace(head, names[head])
    return BadRequest(message, code=err.code, param=param or None)


def message_request(body: Any, settings: Settings, *, counting: bool = False) -> dict[str, Any]:
    """A Messages body → a validated job request. `counting` (count_tokens): `max_tokens` is optional and
    the job generates nothing (max_new_tokens 0: the worker only applies the chat template and tokenizes)."""
    body = _check(body)
    messages, prefill = chat(body)
    job: dict[str, Any] = {"model": public_id(body["model"], settings), "messages": messages}
    if prefill:
        job["continue_final_message"] = True
    limit = body.get("max_tokens")
    if limit is None and not counting:
        raise invalid("max_tokens", "Field required")
    if limit is not None:
        job["max_new_tokens"] = limit
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature > 1:
        raise invalid("temperature", "must be from 0 to 1")
    for name, field in SAMPLING.items():
        if body.get(name) is not None:
            job[field] = body[name]
    try:
        req = parse_job(job, settings)
    except AppError as err:
        if err.status_code != 422:
            raise
        raise _renamed(err) from None
    if counting:
        req["max_new_tokens"] = 0
    return req
