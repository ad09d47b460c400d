"""OpenAI request bodies → job requests (the `GenerationRequest` `POST /v1/jobs` stores), with OpenAI-style 400s."""

from __future__ import annotations

from typing import Any

from qwen_deploy.config import Settings
from qwen_deploy.errors import AppError, BadRequest, ModelNotFound
from qwen_deploy.requests import GenerationRequest
from qwen_deploy.served import served_models
from web.schemas import JobCreate, parse_job, public_id

CHAT, COMPLETIONS, JOBS = "/v1/chat/completions", "/v1/completions", "/v1/jobs"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# Chat fields passed to the job under the same name (checked by the job schema, web/tools.py).
TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs")

# Parameters passed to the job body under the same name (top_k, repetition_penalty, ignore_eos, min_p,
# min_tokens and stop_token_ids are the usual extensions of OpenAI-compatible servers, sent with the SDK's
# `extra_body`).
PASSED = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "top_k",
    "repetition_penalty",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "min_p",
    "min_tokens",
    "stop_token_ids",
)
COMMON = frozenset(
    {
        "service_tier",
        "model",
        "max_tokens",
        "stream",
        "stream_options",
        "user",
        "response_format",
        *PASSED,
    }
)
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", *TOOL_KEYS}
COMPLETION_KEYS = COMMON | {"prompt", "logprobs", "echo", "best_of"}
# Accepted only with their neutral value.
NEUTRAL: dict[str, tuple[object, ...]] = {}


__all__ = ["ModelNotFound"]


def unsupported(param: str, why: str = "is not supported by this server") -> BadRequest:
    return BadRequest(f"{param} {why}", code="unsupported_parameter", param=param)


def model_names(settings: Settings) -> list[str]:
    """Every name that selects a served model, each model's id (alias) first."""
    return [name for m in served_models(settings) for name in m.names]


def model_id(settings: Settings) -> str:
    """The default model's id."""
    return served_models(settings)[0].alias


def check_model(body: dict[str, Any], settings: Settings) -> str:
    """The id of the served model (or adapter) an OpenAI body names (`model` is required there)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required (see GET /v1/models)", code="missing_field", param="model")
    return public_id(model, settings)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") not in ("text", "input_text", "output_text")
                or not isinstance(part.get("text"), str)
            ):
                raise unsupported(f"{where}.{i}", 'must be a text part {"type": "text", "text": ...}')
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where} must be a string or a list of text parts", code="invalid_type", param=where)


def messages(raw: Any, param: str = "messages", start: int = 0) -> list[dict[str, Any]]:
    """Chat messages as job messages: roles system/developer/user/assistant/tool, content joined from text
    parts; an assistant's `tool_calls` and a tool message's `tool_call_id` kept (the job schema checks them).
    `start`: the index of the first one in the request (errors name it)."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"{param} must be a non-empty list of messages", code="invalid_type", param=param)
    out = []
    for i, msg in enumerate(raw, start):
        where = f"{param}.{i}"
        if not isinstance(msg, dict):
            raise BadRequest(f"{where} must be an object", code="invalid_type", param=where)
        role = msg.get("role")
        if role not in ROLES:
            raise BadRequest(
                f"{where}.role must be one of {', '.join(ROLES)}", code="invalid_value", param=f"{where}.role"
            )
        extra = {"assistant": ("tool_calls",), "tool": ("tool_call_id",)}.get(role, ())
        for key in msg:
            if key not in ("role", "content", "type", *extra) or (key == "type" and msg[key] != "message"):
                raise unsupported(f"{where}.{key}")
        job_msg: dict[str, Any] = {"role": ROLES[role]}
        if msg.get("content") is not None or not msg.get("tool_calls"):
            job_msg["content"] = _text(msg.get("content"), f"{where}.content")
        for key in extra:
            if msg.get(key) is not None:
                job_msg[key] = msg[key]
        out.append(job_msg)
    return out


def check_keys(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for key, value in body.items():
        if key not in allowed:
            raise unsupported(key)
        if key in NEUTRAL and value is not None and value not in NEUTRAL[key]:
            raise unsupported(key, f"is supported only as {NEUTRAL[key][0]!r}")


def validated(job: dict[str, Any], renames: dict[str, str], settings: Settings) -> GenerationRequest:
    """parse_job, with 422s turned into OpenAI's 400 and job field names into the request's."""
    response_format = job.pop("response_format", None)
    if response_format is not None and "response_format" in JobCreate.model_fields:
        job["response_format"] = response_format  # validated by the job schema
        response_format = None
    try:
        req = parse_job(job, settings)
    except AppError as err:
        if err.status_code != 422:
            raise
        param = err.param or ""
        head = param.split(".", 1)[0]
        message = err.message
        if head in renames:
            param = renames[head] + param[len(head) :]
            message = message.replace(head, renames[head])
        raise BadRequest(message, code=err.code, param=param or None) from None
    if response_format is not None:
        req.response_format = response_format
    return req


def _common(body: dict[str, Any], job: dict[str, Any], renames: dict[str, str]) -> None:
    for key in PASSED:
        if body.get(key) is not None:
            job[key] = body[key]
    if body.get("response_format") is not None:
        job["response_format"] = body["response_format"]
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise BadRequest("stream_options needs stream: true", code="invalid_value", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise unsupported("stream_options", "may only hold include_usage")
    if body.get("stream") not in (None, True, False):
        raise BadRequest("stream must be a boolean", code="invalid_type", param="stream")


def chat_request(body: Any, settings: Settings) -> GenerationRequest:
    """A chat.completions body → a validated job request."""
    body = _object(body)
    check_keys(body, CHAT_KEYS)
    job: dict[str, Any] = {"model": check_model(body, settings), "messages": messages(body.get("messages"))}
    renames: dict[str, str] = {}
    limit = _max_tokens(body, ("max_completion_tokens", "max_tokens"), renames)
    if limit is not None:
        job["max_new_tokens"] = limit
    _common(body, job, renames)
    for key in ("logprobs", "top_logprobs", *TOOL_KEYS):
        if body.get(key) is not None:
            job[key] = body[key]
    return validated(job, renames, settings)


def completion_request(body: Any, settings: Settings) -> GenerationRequest:
    """A completions body → a validated job request (`logprobs: k` → logprobs with k alternatives)."""
    body = _object(body)
    check_keys(body, COMPLETION_KEYS)
    alias = check_model(body, settings)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a list: the same request as the prompt alone
    if prompt is None:
        raise BadRequest("prompt is required", code="missing_field", param="prompt")
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):  # every sample is returned; none is ranked away
        raise unsupported("best_of", "is supported only equal to n (every sample generated is returned)")
    job: dict[str, Any] = {"model": alias, "prompt": prompt}
    echo = body.get("echo")
    if echo is not None:
        if body.get("stream") and echo:
            raise unsupported("echo", "is not supported with stream: true")
        job["echo"] = echo
    renames: dict[str, str] = {"top_logprobs": "logprobs"}
    limit = _max_tokens(body, ("max_tokens",), renames)
    if limit is not None:
        job["max_new_tokens"] = limit
    _common(body, job, renames)
    k = body.get("logprobs")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest("logprobs must be an integer from 0 to 5", code="invalid_type", param="logprobs")
        job.update(logprobs=True, top_logprobs=k)
    return validated(job, renames, settings)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_type")
    return body


def _max_tokens(body: dict[str, Any], names: tuple[str, ...], renames: dict[str, str]) -> Any:
    given = [(name, body[name]) for name in names if body.get(name) is not None]
    if len({repr(v) for _, v in given}) > 1:
        raise BadRequest(f"{given[0][0]} and {given[1][0]} differ; give one", code="invalid_value", param=given[1][0])
    if not given:
        return None
    renames["max_new_tokens"] = given[0][0]
    return given[0][1]


TRANSLATORS = {CHAT: chat_request, COMPLETIONS: completion_request}


def job_request(url: str, body: Any, settings: Settings) -> GenerationRequest:
    """The job request for a batch line sent to `url` (/v1/jobs, /v1/chat/completions or /v1/completions)."""
    if url == JOBS:
        return parse_job(body, settings)
    if isinstance(body, dict) and body.get("stream"):
        raise unsupported("stream", "is not supported in a batch")
    return TRANSLATORS[url](body, settings)
