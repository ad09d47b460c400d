"""The Responses API over jobs: a response is a job (`resp_<hex>` = `job_<hex>`); background, resumable streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, request, stream_with_context

from qwen_deploy import tool_calls
from qwen_deploy.errors import BadRequest, NotFound
from qwen_deploy.job_records import JOB_ID_PREFIX, valid_id
from qwen_deploy.jobs import TERMINAL
from qwen_deploy.requests import GenerationRequest
from web.auth import current_owner
from web.context import current_services
from web.job_options import service_tier_options
from web.openai_api.bodies import ResponseCreate, ResponseQuery
from web.openai_api.completions import ChatSplit, finished
from web.openai_api.objects import cached_tokens, finish_reason, first_choice, job_body, job_headers
from web.openai_api.shapes import RESPONSE_EVENTS, ResponseObject, job_doc
from web.openai_api.translate import check_keys, check_model, messages, unsupported, validated
from web.openapi import doc
from web.schemas import count_arg, read_json
from web.services import iter_job_events, load_job, load_record, missing, submit_request, wait_for
from web.stream_slots import Slot, counted, open_stream

bp = Blueprint("openai_responses", __name__, url_prefix="/v1/responses")
bp.after_request(job_headers)

PREFIX = "resp_"
KEYS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "background",
        "service_tier",
        "stream",
        "metadata",
        "store",
        "user",
        "text",
        "top_k",
        "seed",
        "ignore_eos",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "canceling": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "canceled": "cancelled",
    "timed_out": "incomplete",
}


def job_id_of(response_id: str) -> str:
    """The job of `resp_<hex>`; 404 for an id of another shape (no key is built from it)."""
    job_id = JOB_ID_PREFIX + response_id.removeprefix(PREFIX)
    if not response_id.startswith(PREFIX) or not valid_id(job_id):
        raise NotFound("no response with this id", param="response_id")
    return job_id


def present(job: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The response object for a job and the request's own fields (`meta`, kept in the job record)."""
    status = STATUS.get(job["status"], "in_progress")
    output = job.get("output") or {}
    reason = output.get("finish_reason")
    if status == "completed" and finish_reason(reason) == "length":
        status = "incomplete"
    items = []
    choice = first_choice(job)
    calls = choice.get("tool_calls") or []
    if job["status"] != "queued" or output.get("text"):
        item_status = {"completed": "completed", "in_progress": "in_progress"}.get(status, "incomplete")
        text = choice.get("content", choice["text"]) or ""
        items.append(
            {
                "type": "message",
                "id": "msg_" + job_body(job["id"]),
                "status": item_status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        )
        items.extend(function_call(call, job["id"], k) for k, call in enumerate(calls))
    raw = output.get("usage") if job["status"] in TERMINAL else None
    usage = None
    if raw:
        usage = {
            "input_tokens": raw["prompt_tokens"],
            "output_tokens": raw["completion_tokens"],
            "total_tokens": raw["prompt_tokens"] + raw["completion_tokens"],
            "input_tokens_details": {"cached_tokens": cached_tokens(raw)},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
    error = job.get("error") if status == "failed" else None
    return {
        "id": PREFIX + job_body(job["id"]),
        "object": "response",
        "created_at": int(job.get("created_at") or 0),
        "status": status,
        "background": meta.get("background", False),
        "model": meta.get("model"),
        "error": {"code": error.get("code"), "message": error.get("message")} if error else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": meta.get("instructions"),
        "max_output_tokens": meta.get("max_output_tokens"),
        "metadata": meta.get("metadata") or {},
        "output": items,
        "parallel_tool_calls": meta.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "temperature": meta.get("temperature"),
        "top_p": meta.get("top_p"),
        "text": {"format": {"type": "text"}},
        "tool_choice": meta.get("tool_choice") or "auto",
        "tools": meta.get("tools") or [],
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "store": True,
    }


def function_call(call: dict[str, Any], job_id: str, k: int) -> dict[str, Any]:
    """A call (OpenAI's chat shape) as a `function_call` output item."""
    return {
        "type": "function_call",
        "id": f"fc_{job_body(job_id)}_{k}",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": "completed",
    }


def _tools(body: dict[str, Any], job: dict[str, Any]) -> None:
    """Function tools (`{"type": "function", "name", "description", "parameters", "strict"}`) and
    tool_choice as the job's chat-shaped fields."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("tools must be a list", code="invalid_type", param="tools")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise unsupported(f"tools.{i}.type", "supports only function tools")
            for key in tool:
                if key not in ("type", "name", "description", "parameters", "strict"):
                    raise unsupported(f"tools.{i}.{key}")
            function = {k: v for k, v in tool.items() if k != "type" and v is not None}
            converted.append({"type": "function", "function": function})
        if converted:
            job["tools"] = converted
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or set(choice) != {"type", "name"}:
            raise unsupported("tool_choice", 'must be auto, none, required or {"type": "function", "name"}')
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        job["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        job["parallel_tool_calls"] = body["parallel_tool_calls"]


def _input(raw: list[Any]) -> list[dict[str, Any]]:
    """Input items as job messages: messages, `function_call` items (an assistant's tool_calls; adjacent
    ones join one message) and `function_call_output` items (tool messages)."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        at = f"input.{i}"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "function_call":
            for key in item:
                if key not in ("type", "call_id", "name", "arguments", "id", "status"):
                    raise unsupported(f"{at}.{key}")
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and out[-1]["from"] == i - 1:
                out[-1]["tool_calls"].append(call)
                out[-1]["from"] = i
            else:
                out.append({"role": "assistant", "tool_calls": [call], "from": i})
        elif kind == "function_call_output":
            for key in item:
                if key not in ("type", "call_id", "output", "id", "status"):
                    raise unsupported(f"{at}.{key}")
            if not isinstance(item.get("output"), str):
                raise BadRequest(f"{at}.output must be a string", code="invalid_type", param=f"{at}.output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item["output"]})
        else:
            out.extend(messages([item], "input", i))
    for msg in out:
        msg.pop("from", None)
    return out


def _meta(job_id: str) -> dict[str, Any]:
    raw = current_services().store.get(job_id) or {}
    return json.loads(raw.get("response") or "{}")


def _request(body: Any) -> tuple[GenerationRequest, dict[str, Any]]:
    """(job request, response fields) for a responses.create body."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_type")
    check_keys(body, KEYS)
    settings = current_services().settings
    alias = check_model(body, settings)
    text = body.get("text")
    if text is not None and text != {"format": {"type": "text"}}:
        raise unsupported("text", 'supports only {"format": {"type": "text"}}')
    raw = body.get("input")
    if isinstance(raw, list) and raw:
        chat = _input(raw)
    else:
        chat = [{"role": "user", "content": raw}] if isinstance(raw, str) else messages(raw, "input")
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise BadRequest("instructions must be a string", code="invalid_type", param="instructions")
        chat = [{"role": "system", "content": body["instructions"]}, *chat]
    job: dict[str, Any] = {"model": alias, "messages": chat}
    for key in ("temperature", "top_p", "top_k", "seed", "ignore_eos"):
        if body.get(key) is not None:
            job[key] = body[key]
    if body.get("max_output_tokens") is not None:
        job["max_new_tokens"] = body["max_output_tokens"]
    _tools(body, job)
    req = validated(job, {"max_new_tokens": "max_output_tokens", "messages": "input"}, settings)
    meta = {
        key: body.get(key) for key in ("model", "instructions", "max_output_tokens", "temperature", "top_p", "metadata")
    }
    meta.update({key: body[key] for key in ("tools", "tool_choice", "parallel_tool_calls") if key in body})
    meta["tool_mode"] = tool_calls.mode(req.tool_fields())
    meta["background"] = bool(body.get("background"))
    return req, meta


def events(job_id: str, meta: dict[str, Any], after: int, cancel_on_close: bool) -> Iterator[str]:
    """`response.*` events numbered from 0 in the order of the job's events, so a replay numbers them alike."""
    store, owner = current_services().store, current_owner()
    seq, done = -1, False

    def emit(kind: str, **data: Any) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **data})}\n\n"

    def lines() -> Iterator[str]:
        nonlocal done
        start = {**present(load_job(job_id), meta), "output": []}
        yield emit("response.created", response=start)
        yield emit("response.in_progress", response={**start, "status": "in_progress"})
        item: dict[str, Any] = {
            "type": "message",
            "id": "msg_" + job_body(job_id),
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        place = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        yield emit("response.output_item.added", output_index=0, item=item)
        yield emit(
            "response.content_part.added",
            **place,
            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        )
        final: dict[str, Any] = {}
        split, streamed = ChatSplit(1, meta.get("tool_mode", "none")), ""
        for what, ev in iter_job_events(job_id):
            if what == "token" and ev.get("text"):
                streamed += ev["text"]
                for fields in split.deltas(0, streamed):
                    if fields.get("content"):
                        yield emit("response.output_text.delta", **place, delta=fields["content"], logprobs=[])
            elif what == "done":
                final = ev
        done = True
        response = present(final or load_job(job_id), meta)
        message = (
            response["output"][0]
            if response["output"]
            else {**item, "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        )
        for fields in split.final({**first_choice(final), "tool_calls": None} if final else {"index": 0, "text": ""}):
            if fields.get("content"):
                yield emit("response.output_text.delta", **place, delta=fields["content"], logprobs=[])
        part = message["content"][0]
        yield emit("response.output_text.done", **place, text=part["text"], logprobs=[])
        yield emit("response.content_part.done", **place, part=part)
        yield emit("response.output_item.done", output_index=0, item=message)
        for index, call in enumerate(response["output"][1:], 1):
            yield emit("response.output_item.added", output_index=index, item={**call, "arguments": ""})
            at = {"item_id": call["id"], "output_index": index}
            yield emit("response.function_call_arguments.delta", **at, delta=call["arguments"])
            yield emit("response.function_call_arguments.done", **at, arguments=call["arguments"])
            yield emit("response.output_item.done", output_index=index, item=call)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response["status"], "response.failed"
        )
        yield emit(kind, response=response)

    try:
        for line in lines():
            if seq > after:
                yield line
    except GeneratorExit:
        if cancel_on_close and not done:
            store.cancel(job_id, owner)
        raise


def _stream(job_id: str, meta: dict[str, Any], after: int, cancel_on_close: bool, slot: Slot) -> Response:
    body = stream_with_context(counted(events(job_id, meta, after, cancel_on_close), slot))
    return Response(
        body, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _json(data: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


@bp.post("")
@job_doc(ResponseObject, ResponseCreate, RESPONSE_EVENTS)
def create_response() -> Response:
    """Create a response (a job); `background: true` answers at once with status queued."""
    body = read_json(request)
    req, meta = _request(body)
    slot = open_stream() if body.get("stream") else None  # 429 past the cap, before a job is made
    job, _ = submit_request(
        req, request.headers.get("Idempotency-Key"), service_tier_options(body), response=json.dumps(meta)
    )
    g.openai_job_id = job["id"]
    if slot is not None:
        return _stream(job["id"], meta, -1, not meta["background"], slot)
    if meta["background"]:
        return _json(present(job, meta))
    return _json(present(finished(job["id"]), meta))


@bp.get("/<response_id>")
@doc(model=ResponseObject, query=ResponseQuery, media=RESPONSE_EVENTS, tags=("openai",))
def get_response(response_id: str) -> Response:
    """The response; `?stream=true&starting_after=N` replays its events after sequence number N."""
    job_id = job_id_of(response_id)
    job = load_job(job_id)
    meta = _meta(job_id)
    if request.args.get("stream", "false").lower() != "true":
        return _json(present(job, meta))
    raw = request.args.get("starting_after", "-1")
    after = -1 if raw == "-1" else count_arg(raw, "starting_after", 0, 10**12 - 1)  # a sequence number
    return _stream(job_id, meta, after, False, open_stream())


@bp.post("/<response_id>/cancel")
@doc(model=ResponseObject, tags=("openai",))
def cancel_response(response_id: str) -> Response:
    """Cancel a queued or running response; a finished one is returned as it is."""
    job_id = job_id_of(response_id)
    load_record(job_id)  # 404 for a malformed id or another owner's job, before any effect
    outcome = current_services().store.cancel(job_id, current_owner())
    if outcome == "missing":
        raise missing("response", job_id)
    job = load_job(job_id)
    meta = _meta(job_id)
    if outcome == "canceling":  # running: it stops within ~50 ms
        job = wait_for(job_id, 5.0)
    return _json(present(job, meta))
