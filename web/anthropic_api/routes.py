"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: each request is one job, awaited or streamed.

Errors on these routes leave in Anthropic's envelope `{"type": "error", "error": {type, message}}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, g, request, stream_with_context

from qwen_deploy import tool_calls
from web.anthropic_api.objects import (
    Blocks,
    envelope,
    error_body,
    event,
    message,
    message_end,
    message_start,
)
from web.anthropic_api.translate import message_request
from web.context import current_services
from web.openai_api.completions import ChatSplit, finished
from web.openai_api.objects import first_choice, job_headers
from web.schemas import read_json
from web.services import iter_job_events, submit_request
from web.stream_slots import counted, open_stream

bp = Blueprint("anthropic_messages", __name__, url_prefix="/v1")
bp.after_request(job_headers)  # X-Job-Id; x-should-retry: false once a job exists


@bp.after_request
def anthropic_errors(response: Response) -> Response:
    """Any error of these routes (raised here, by the auth check or by Flask) in Anthropic's envelope."""
    if response.status_code < 400 or response.mimetype != "application/json":
        return response
    converted = envelope(response.status_code, response.get_json(silent=True))
    if converted is not None:
        response.status_code = converted[0]
        response.set_data(json.dumps(converted[1]))
    return response


def _json(data: dict[str, Any]) -> Response:
    return Response(json.dumps(data), mimetype="application/json")


@bp.post("/messages")
def create_message() -> Response:
    """Anthropic's Messages API over one job (`stream: true`: Anthropic's server-sent events)."""
    body = read_json(request)
    req = message_request(body, current_services().settings)
    stops, model = list(req.stop), body["model"]
    slot = open_stream() if body.get("stream") else None  # 429 before any job exists
    try:
        job, _ = submit_request(req, request.headers.get("Idempotency-Key"))
    except BaseException:
        if slot is not None:
            _release(slot)
        raise
    g.openai_job_id = job["id"]
    if slot is not None:
        events = stream_with_context(counted(stream(job, model, stops, tool_calls.mode(req.tool_fields())), slot))
        return Response(
            events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    return _json(message(finished(job["id"]), model, stops))


@bp.post("/messages/count_tokens")
def count_tokens() -> Response:
    """`{"input_tokens"}` of a Messages body: a job that only applies the chat template and tokenizes."""
    req = message_request(read_json(request), current_services().settings, counting=True)
    job, _ = submit_request(req, request.headers.get("Idempotency-Key"))
    g.openai_job_id = job["id"]
    usage = (finished(job["id"]).get("output") or {}).get("usage") or {}
    return _json({"input_tokens": int(usage.get("prompt_tokens") or 0)})


def stream(job: dict[str, Any], model: str, stops: list[str], tool_mode: str = "none") -> Iterator[str]:
    """message_start, ping, the content blocks as they come (thinking, text, then one tool_use block per
    call; ping while idle), message_delta, message_stop; a failed job ends
    with an `error` event; a client that goes away cancels the job."""
    store, job_id = current_services().store, job["id"]
    streamed, done = "", False
    split, blocks = ChatSplit(1, tool_mode), Blocks()
    try:
        yield message_start(job, model)
        yield event("ping", {})
        final: dict[str, Any] | None = None
        for what, ev in iter_job_events(job_id):
            if what == "token" and not ev.get("index") and ev.get("text"):
                streamed += ev["text"]
                yield "".join(_deltas(blocks, split.deltas(0, streamed)))
            elif what == "idle":  # keeps proxies open and notices a client that went away
                yield event("ping", {})
            elif what == "done":
                final = ev
        done = True
        if final is None or final["status"] == "failed":
            error = (final or {}).get("error") or {"message": f"job {job_id} vanished"}
            failure = error_body("api_error", f"the generation failed: {error.get('message')} (job {job_id})")
            yield f"event: error\ndata: {json.dumps(failure)}\n\n"
            return
        choice = first_choice(final)
        yield "".join(_deltas(blocks, split.final({**choice, "tool_calls": None})))
        for call in choice.get("tool_calls") or []:
            yield blocks.tool_use(call)
        yield message_end(final, stops, blocks)
    except GeneratorExit:
        if not done:
            store.cancel(job_id)
        raise


def _deltas(blocks: Blocks, fields: list[dict[str, Any]]) -> Iterator[str]:
    for field in fields:
        if field.get("reasoning_content"):
            yield blocks.delta("thinking", field["reasoning_content"])
        if field.get("content"):
            yield blocks.delta("text", field["content"])


def _release(slot: tuple[redis.Redis, str, str]) -> None:
    try:
        slot[0].zrem(slot[1], slot[2])
    except redis.RedisError:
        pass  # the slot lapses at its score
