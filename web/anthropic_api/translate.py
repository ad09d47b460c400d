"""Anthropic Messages bodies → job requests (the dict `POST /v1/jobs` stores), with 400s naming the parameter.

`system` and message content as strings or text blocks; `tool_use` blocks (assistant) become the job
message's `tool_calls`, `tool_result` blocks (user) tool messages; `tools` and `tool_choice` become the
job's function tools (qwen_deploy/tool_calls.py). A trailing assistant message is a
prefill the model continues (the job's `continue_final_message`). Absent sampling fields keep the job
defaults (greedy), as on the OpenAI routes; `temperature` takes Anthropic's 0 to 1.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_deploy.config import Settings
from qwen_deploy.errors import AppError, BadRequest
from qwen_deploy.requests import GenerationRequest
from web.schemas import parse_job, public_id

# Fields of a request that become job fields (request name → job name).
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "stop_sequences": "stop"}
# Accepted and without effect on the text: request metadata (Anthropic keeps it for abuse tracking) and
# the capacity tier.
IGNORED = frozenset({"metadata", "service_tier"})
MESSAGE_KEYS = frozenset(
    {"model", "messages", "system", "max_tokens", "stream", "tools", "tool_choice", *SAMPLING, *IGNORED}
)
TOOL_KEYS = frozenset({"name", "description", "input_schema", "type", "cache_control"})
CHOICES = {"auto": "auto", "any": "required", "none": "none"}
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


def _tool_result(block: dict[str, Any], at: str) -> dict[str, Any]:
    for key in block:
        if key not in ("type", "tool_use_id", "content", "is_error") and key not in BLOCK_HINTS:
            raise unsupported(f"{at}.{key}")
    if not isinstance(block.get("tool_use_id"), str):
        raise invalid(f"{at}.tool_use_id", "must be a string")
    content = block.get("content", "")
    text = text_of(content, f"{at}.content")
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _tool_use(block: dict[str, Any], at: str) -> dict[str, Any]:
    for key in block:
        if key not in ("type", "id", "name", "input") and key not in BLOCK_HINTS:
            raise unsupported(f"{at}.{key}")
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise invalid(at, "a tool_use block needs a string id and name")
    if not isinstance(block.get("input"), dict):
        raise invalid(f"{at}.input", "must be an object")
    arguments = json.dumps(block["input"], ensure_ascii=False)
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}


def _turn(msg: dict[str, Any], at: str, calls: set[str]) -> list[dict[str, Any]]:
    """One Anthropic message as job messages: tool results first (one tool message each), then the text
    (with an assistant's tool_use blocks as its tool_calls). `calls` holds the ids of earlier tool_use."""
    role, content = msg["role"], msg.get("content")
    if not isinstance(content, list):
        return [{"role": role, "content": text_of(content, f"{at}.content")}]
    kinds = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use")}[role]
    results, uses = [], []
    texts: list[Any] = []  # the text blocks, tool blocks as empty text (so a bad block's index is its own)
    for i, block in enumerate(content):
        where = f"{at}.content.{i}"
        kind = block.get("type") if isinstance(block, dict) else None
        texts.append(block if kind not in kinds[1:] else {"type": "text", "text": ""})
        if kind not in kinds[1:]:
            continue
        if kind == "tool_result":
            result = _tool_result(block, where)
            if result["tool_call_id"] not in calls:
                raise invalid(f"{where}.tool_use_id", "must name a tool_use block of an earlier assistant message")
            results.append(result)
        else:
            uses.append(_tool_use(block, where))
            calls.add(uses[-1]["id"])
    out = list(results)
    text = text_of(texts, f"{at}.content")
    if uses:
        out.append({"role": "assistant", "content": text or None, "tool_calls": uses})
    elif text or not results:
        out.append({"role": role, "content": text})
    return out


def _tools(body: dict[str, Any], job: dict[str, Any]) -> None:
    """`tools` and `tool_choice` as the job's function tools."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools", "must be a list of tools")
        converted = []
        for i, tool in enumerate(tools):
            at = f"tools.{i}"
            if not isinstance(tool, dict):
                raise invalid(at, "must be an object with name and input_schema")
            if tool.get("type", "custom") != "custom":
                raise unsupported(f"{at}.type", f"server tools ({tool.get('type')!r}) are not supported")
            for key in tool:
                if key not in TOOL_KEYS:
                    raise unsupported(f"{at}.{key}")
            function = {k: tool[k] for k in ("name", "description") if k in tool}
            if "input_schema" not in tool:
                raise invalid(f"{at}.input_schema", "Field required")
            function["parameters"] = tool["input_schema"]
            converted.append({"type": "function", "function": function})
        if converted:
            job["tools"] = converted
    choice = body.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in (*CHOICES, "tool"):
        raise invalid("tool_choice.type", "must be auto, any, tool or none")
    for key in choice:
        if key not in ("type", "name", "disable_parallel_tool_use"):
            raise unsupported(f"tool_choice.{key}")
    if choice["type"] == "tool":
        job["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        job["tool_choice"] = CHOICES[choice["type"]]
    if choice.get("disable_parallel_tool_use") is not None and choice["type"] != "none":
        job["parallel_tool_calls"] = not choice["disable_parallel_tool_use"]


def chat(body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The job's chat messages (system first) and whether the last one is an assistant prefill."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("messages", "must be a non-empty list of messages")
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
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
        out.extend(_turn(msg, at, calls))
    prefill = out[-1]["role"] == "assistant" and not out[-1].get("tool_calls")
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
    for job_name, name in (("function.parameters", "input_schema"), ("function.name", "name")):
        if head in ("tools", "tool_choice") and job_name in param:
            param, message = param.replace(job_name, name), message.replace(job_name, name)
    if param and param not in message:
        message = f"{param}: {message}"
    return BadRequest(message, code=err.code, param=param or None)


def message_request(body: Any, settings: Settings, *, counting: bool = False) -> GenerationRequest:
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
    _tools(body, job)
    try:
        req = parse_job(job, settings)
    except AppError as err:
        if err.status_code != 422:
            raise
        raise _renamed(err) from None
    if counting:
        req.max_new_tokens = 0
    return req
