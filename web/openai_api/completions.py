"""`POST /v1/chat/completions` and `POST /v1/completions`: each request is one job, awaited or streamed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, g, request, stream_with_context

from qwen_deploy import tool_calls
from qwen_deploy.config import Settings
from qwen_deploy.errors import AppError, BadRequest, GatewayTimeout
from qwen_deploy.jobs import TERMINAL
from qwen_deploy.requests import GenerationRequest
from web.auth import current_owner
from web.context import current_services
from web.job_options import service_tier_options
from web.openai_api.bodies import ChatCompletionCreate, CompletionCreate
from web.openai_api.objects import (
    PRESENTERS,
    chat_finish,
    choices,
    finish_reason,
    job_headers,
    tool_call_deltas,
    usage,
)
from web.openai_api.shapes import CHUNKS, ChatCompletion, TextCompletion, job_doc
from web.openai_api.translate import chat_request, completion_request
from web.schemas import read_json
from web.services import iter_job_events, submit_request, wait_for
from web.stream_slots import counted, open_stream

bp = Blueprint("openai_completions", __name__, url_prefix="/v1")
bp.after_request(job_headers)

NO_RETRY = {"x-should-retry": "false"}  # the job exists: a retry would generate again
CLIENT_ERRORS = {"invalid_prompt": "prompt"}  # failures that are the request's fault: 400 naming the parameter


class JobFailed(AppError):
    status_code, code, type = 500, "generation_failed", "server_error"


def finished(job_id: str) -> dict[str, Any]:
    """The terminal job; past the hard time limit it is canceled (keeping its partial text), never re-run."""
    svc = current_services()
    hard = svc.settings.limits.hard_time_limit
    job = wait_for(job_id, hard + min(5.0, hard))  # the grace lets the worker record its own time-out first
    if job["status"] not in TERMINAL:
        svc.store.cancel(job_id, current_owner())
        job = wait_for(job_id, 5.0)
    if job["status"] not in TERMINAL:
        raise GatewayTimeout(
            f"job {job_id} did not finish in time; it was canceled",
            param="id",
            headers={**NO_RETRY, "Location": f"/v1/jobs/{job_id}"},
        )
    if job["status"] == "failed":
        error = job.get("error") or {}
        if error.get("code") in CLIENT_ERRORS:  # the worker found the request bad (a token id not in the vocabulary)
            raise BadRequest(
                f"{error.get('message')} (job {job_id})",
                code=error["code"],
                param=CLIENT_ERRORS[error["code"]],
                headers=NO_RETRY,
            )
        raise JobFailed(
            f"the generation failed: {error.get('message', 'unknown error')} (job {job_id})",
            code=error.get("code") or JobFailed.code,
            headers=NO_RETRY,
        )
    output = job.get("output")
    if output is not None and not output.get("finish_reason"):
        output["finish_reason"] = "length"  # stopped by the hard time limit or a cancel before any token
    return job


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class ChatSplit:
    """The reasoning and content deltas of streamed chat samples (tool_calls.visible): text that may still
    become a tool call or reasoning is held until it is known; the final choices settle the rest."""

    def __init__(self, n: int, tool_mode: str) -> None:
        self.tool_mode = tool_mode
        self.sent = [("", "")] * n

    def deltas(self, index: int, text: str) -> list[dict[str, Any]]:
        """Delta fields for sample `index` whose text so far is `text`."""
        reasoning, content = tool_calls.visible(text, self.tool_mode)
        return self._advance(index, reasoning, content)

    def _advance(self, index: int, reasoning: str | None, content: str | None) -> list[dict[str, Any]]:
        old_r, old_c = self.sent[index]
        out = []
        if reasoning and reasoning.startswith(old_r) and len(reasoning) > len(old_r):
            out.append({"reasoning_content": reasoning[len(old_r) :]})
            old_r = reasoning
        if content and content.startswith(old_c) and len(content) > len(old_c):
            out.append({"content": content[len(old_c) :]})
            old_c = content
        self.sent[index] = (old_r, old_c)
        return out

    def final(self, choice: dict[str, Any]) -> list[dict[str, Any]]:
        """The deltas that finish a choice: its reasoning and content not yet sent, then its calls."""
        content = choice.get("content", choice["text"])
        out = self._advance(choice["index"], choice.get("reasoning_content"), content)
        return out + [{"tool_calls": [d]} for d in tool_call_deltas(choice.get("tool_calls") or [])]


def stream(
    job: dict[str, Any], model: str, kind: str, n: int, include_usage: bool, tool_mode: str = "none"
) -> Iterator[str]:
    """`data:` lines only (the SDK's parser needs no comments), then `data: [DONE]`; a disconnect cancels."""
    _, chunk, delta = PRESENTERS[kind]
    store, job_id, owner = current_services().store, job["id"], current_owner()
    streamed, done = [""] * n, False
    split = ChatSplit(n, tool_mode) if kind == "chat" else None
    try:
        if kind == "chat":
            yield sse(chunk(job, model, [delta(i, "", role=True) for i in range(n)], None, include_usage))
        final: dict[str, Any] | None = None
        for what, ev in iter_job_events(job_id):
            if what == "token":
                index, text = int(ev.get("index") or 0), ev.get("text", "")
                if text and index < n:
                    streamed[index] += text
                    if split is None:
                        yield sse(chunk(job, model, [delta(index, text)], None, include_usage))
                        continue
                    for fields in split.deltas(index, streamed[index]):
                        yield sse(chunk(job, model, [delta(index, **fields)], None, include_usage))
            elif what == "idle":  # keeps proxies open and notices a client that went away
                yield sse(chunk(job, model, [delta(0, "")], None, include_usage))
            elif what == "done":
                final = ev
        done = True
        if final is None or final["status"] == "failed":
            error = (final or {}).get("error") or {"code": "not_found", "message": f"job {job_id} vanished"}
            yield sse(
                {
                    "error": {
                        "type": "server_error",
                        "code": error.get("code"),
                        "param": None,
                        "message": f"the generation failed: {error.get('message')} (job {job_id})",
                    }
                }
            )
            return
        for c in choices(final):
            i, text = c["index"], c["text"]
            if split is not None and i < n:
                for fields in split.final(c):
                    yield sse(chunk(final, model, [delta(i, **fields)], None, include_usage))
            else:
                rest = text[len(streamed[i]) :] if i < n and text.startswith(streamed[i]) else ""
                if rest:
                    yield sse(chunk(final, model, [delta(i, rest)], None, include_usage))
            reason = (chat_finish(c) if split is not None else finish_reason(c.get("finish_reason"))) or "length"
            yield sse(
                chunk(final, model, [delta(i, None, finish=reason, logprobs=c.get("logprobs"))], None, include_usage)
            )
        if include_usage:
            yield sse(chunk(final, model, [], usage(final), True))
        yield "data: [DONE]\n\n"
    except GeneratorExit:
        if not done:
            store.cancel(job_id, owner)
        raise


def _serve(kind: str, translate: Callable[[Any, Settings], GenerationRequest]) -> Response:
    body = read_json(request)
    req = translate(body, current_services().settings)
    slot = open_stream() if body.get("stream") else None  # 429 past the cap, before a job is made
    job, _ = submit_request(req, request.headers.get("Idempotency-Key"), service_tier_options(body))
    g.openai_job_id = job["id"]
    model = body["model"]
    if slot is not None:
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        tool_mode = tool_calls.mode(req.tool_fields())
        events = stream_with_context(counted(stream(job, model, kind, req.n, include, tool_mode), slot))
        return Response(
            events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    present = PRESENTERS[kind][0]
    return Response(json.dumps(present(finished(job["id"]), model)), mimetype="application/json")


@bp.post("/chat/completions")
@job_doc(ChatCompletion, ChatCompletionCreate, CHUNKS)
def chat_completions() -> Response:
    """OpenAI chat completions over one job (`stream: true`: chat.completion.chunk events)."""
    return _serve("chat", chat_request)


@bp.post("/completions")
@job_doc(TextCompletion, CompletionCreate, CHUNKS)
def completions() -> Response:
    """OpenAI (legacy) text completions over one job (`stream: true`: text_completion events)."""
    return _serve("text", completion_request)
