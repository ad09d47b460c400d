"""Job objects presented as OpenAI objects: chat.completion, text_completion, their chunks, usage, logprobs."""

from __future__ import annotations

import functools
from typing import Any

from flask import Response, g

from qwen_deploy.job_records import JOB_ID_PREFIX

# Job finish reasons → OpenAI's: a cut-off text (token cap, time budget, cancel) is "length".
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "time_limit": "length", "canceled": "length"}


def finish_reason(reason: str | None) -> str | None:
    return FINISH.get(reason or "", "length" if reason else None)


def job_body(job_id: str) -> str:
    return job_id.removeprefix(JOB_ID_PREFIX)


def created(job: dict[str, Any]) -> int:
    return int(float(job.get("created_at") or 0))


def choices(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's samples: `output.choices` when the worker wrote them, else one from `output.text`."""
    output = job.get("output") or {}
    if output.get("choices"):
        return output["choices"]
    return [
        {"index": 0, "text": output.get("text", ""), "finish_reason": output.get("finish_reason"), "logprobs": None}
    ]


def first_choice(job: dict[str, Any]) -> dict[str, Any]:
    """The job's first sample: with tools or reasoning the worker parsed it (`content`, `tool_calls`,
    `reasoning_content`); otherwise its `text`."""
    output = job.get("output") or {}
    for choice in output.get("choices") or []:
        if choice.get("index") == 0:
            return dict(choice)
    return {"index": 0, "text": output.get("text", "")}


def usage(job: dict[str, Any]) -> dict[str, Any]:
    raw = (job.get("output") or {}).get("usage") or {}
    prompt, completion = int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens(raw)},
    }


def cached_tokens(usage: dict[str, Any]) -> int:
    """Prompt tokens served from the worker's prefix cache (0 for records written without the field)."""
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def chat_logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    if not logprobs:
        return None
    return {"content": logprobs.get("content") or [], "refusal": None}


def completion_logprobs(
    logprobs: dict[str, Any] | None, start: int = 0, prompt: list[dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists of tokens, logprobs, alternatives and text offsets; with
    `prompt` (echo), the prompt's tokens come first (the first one's logprob and alternatives are null) and the
    generated ones' offsets start at `start` (the prompt text's length)."""
    if not logprobs and prompt is None:
        return None
    content = [*(prompt or []), *((logprobs or {}).get("content") or [])]
    offsets, at = [], 0
    for i, item in enumerate(content):
        if prompt is not None and i == len(prompt):
            at = start  # the generated text follows the prompt as echoed
        offsets.append(at)
        at += len(item["token"])
    return {
        "tokens": [t["token"] for t in content],
        "token_logprobs": [t["logprob"] for t in content],
        "top_logprobs": [
            None if t["logprob"] is None else {alt["token"]: alt["logprob"] for alt in t.get("top_logprobs") or []}
            for t in content
        ],
        "text_offset": offsets,
    }


def chat_finish(choice: dict[str, Any]) -> str | None:
    """A choice's OpenAI finish reason: `tool_calls` when it ended on its own with calls."""
    reason = finish_reason(choice.get("finish_reason"))
    return "tool_calls" if choice.get("tool_calls") and reason == "stop" else reason


def chat_message(choice: dict[str, Any]) -> dict[str, Any]:
    """The assistant message of a choice: its content (without calls and reasoning when the worker parsed
    them apart), `tool_calls` and `reasoning_content` when present."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.get("content", choice["text"]), "refusal": None}
    if choice.get("tool_calls"):
        message["tool_calls"] = choice["tool_calls"]
    if choice.get("reasoning_content") is not None:
        message["reasoning_content"] = choice["reasoning_content"]
    return message


def chat_completion(job: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + job_body(job["id"]),
        "object": "chat.completion",
        "created": created(job),
        "model": model,
        "system_fingerprint": None,
        "service_tier": None,
        "choices": [
            {
                "index": c["index"],
                "finish_reason": chat_finish(c),
                "message": chat_message(c),
                "logprobs": chat_logprobs(c.get("logprobs")),
            }
            for c in choices(job)
        ],
        "usage": usage(job),
    }


def text_completion(job: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "id": "cmpl-" + job_body(job["id"]),
        "object": "text_completion",
        "created": created(job),
        "model": model,
        "system_fingerprint": None,
        "choices": [text_choice(c) for c in choices(job)],
        "usage": usage(job),
    }


def text_choice(c: dict[str, Any]) -> dict[str, Any]:
    """A text_completion choice; with echo, the prompt's text (and its tokens' logprobs) first."""
    echo = c.get("echo")
    logprobs = c.get("logprobs")
    prompt = c.get("prompt_logprobs") if echo is not None else None
    return {
        "index": c["index"],
        "text": (echo or "") + c["text"],
        "finish_reason": finish_reason(c.get("finish_reason")),
        "logprobs": completion_logprobs(logprobs, len(echo or ""), prompt) if logprobs or prompt else None,
    }


def _chunk(
    id_prefix: str,
    kind: str,
    job: dict[str, Any],
    model: str,
    chunk_choices: list[dict[str, Any]],
    usage_value: Any = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    chunk = {
        "id": id_prefix + job_body(job["id"]),
        "object": kind,
        "created": created(job),
        "model": model,
        "system_fingerprint": None,
        "choices": chunk_choices,
    }
    if with_usage:
        chunk["usage"] = usage_value
    return chunk


chat_chunk = functools.partial(_chunk, "chatcmpl-", "chat.completion.chunk")
text_chunk = functools.partial(_chunk, "cmpl-", "text_completion")


def chat_delta(
    index: int,
    text: str | None = None,
    role: bool = False,
    finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A chat chunk's choice; `fields` are further delta fields (reasoning_content, tool_calls)."""
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    delta.update(fields)
    return {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}


def tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed calls as OpenAI sends them: per call its index, id, type and name first (empty
    arguments), then the arguments (the SDK's stream helper joins the pieces)."""
    out = []
    for k, call in enumerate(calls):
        name = call["function"]["name"]
        out.append({"index": k, "id": call["id"], "type": "function", "function": {"name": name, "arguments": ""}})
        out.append({"index": k, "function": {"arguments": call["function"]["arguments"]}})
    return out


def text_delta(
    index: int,
    text: str | None = None,
    role: bool = False,
    finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    return {"index": index, "text": text or "", "logprobs": completion_logprobs(logprobs), "finish_reason": finish}


PRESENTERS = {"chat": (chat_completion, chat_chunk, chat_delta), "text": (text_completion, text_chunk, text_delta)}


def job_headers(response: Response) -> Response:
    """After a route that ran a job (it set `g.openai_job_id`): `X-Job-Id`, and `x-should-retry: false` on
    an error (the SDK must not retry a request whose job exists). Registered on those routes' blueprints."""
    job_id = g.get("openai_job_id")
    if job_id:
        response.headers["X-Job-Id"] = job_id
        if response.status_code >= 400:
            response.headers.setdefault("x-should-retry", "false")
    return response
