"""Batch routes: create (JSON or OpenAI-Batch JSONL), read, results while running, cancel."""

from __future__ import annotations

import json
import time

from flask import Blueprint, Response, g, request

from qwen_deploy.batches import BATCH_ID_PREFIX, TERMINAL, BatchCaps, public_batch
from qwen_deploy.errors import AppError, Conflict, QueueFull, TooManyRequests, Unprocessable
from qwen_deploy.job_records import new_id, strings
from qwen_deploy.queues import BATCH_CHUNK_TASK, task_message
from qwen_deploy.webhooks import check_request
from web import batch_quota
from web.auth import current_owner
from web.batch_input import JSONL_TYPES, check_ids, check_metadata, line_error, read_lines, validate_line
from web.context import current_services
from web.job_options import parse_duration
from web.openai_api.batch_files import present_lines
from web.openapi import Batch, ResultsQuery, doc
from web.schemas import COUNT, BatchCreate, pick_model
from web.services import batch_store, load_batch, missing

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")

MAX_LINE_INDEX = 2**31
DEFAULT_RESULTS = 1000


@bp.post("")
@doc(ok=202, model=Batch, json=BatchCreate, tags=("batches",))
def create_batch() -> Response:
    """Create a batch from JSON `{"requests": [...]}` or an OpenAI Batch JSONL body (application/x-ndjson)."""
    svc = current_services()
    items, metadata, extra = read_lines()
    jsonl = request.mimetype in JSONL_TYPES or "input_file_id" in extra
    limit = svc.settings.batches.max_lines
    if not items:
        raise Unprocessable("the batch has no requests", code="empty_batch", param="requests")
    if len(items) > limit:
        raise Unprocessable(
            f"the batch has {len(items)} lines; the maximum is {limit}", code="too_many_lines", param="requests"
        )
    check_metadata(metadata)
    check_ids(items)
    hook = check_request(g.get("batch_webhook") or request.args.get("webhook"), None, svc.settings)
    good: list[str] = []
    errors: list[str] = []
    model: str | None = None  # a batch runs on one model: its first valid line's
    for line, item in items:
        try:
            valid = validate_line(line, item, jsonl, extra["endpoint"])
            model = model or valid["body"]["model"]
            if valid["body"]["model"] != model:
                raise Unprocessable(
                    f"a batch runs on one model ({model!r}, from its first valid line); this line "
                    f"names {valid['body']['model']!r}",
                    code="mixed_models",
                    param="body.model",
                )
            good.append(json.dumps(valid))
        except AppError as err:
            cid = item.get("custom_id") if isinstance(item, dict) else None
            errors.append(json.dumps(line_error(line, cid, err.code, err.message, err.param)))
    served = pick_model(model, svc.settings)  # every line's model was checked
    bulk = served.bulk
    batch_id = new_id(BATCH_ID_PREFIX)
    size, lim = svc.settings.batches.micro_batch_size, svc.settings.limits
    messages = [
        (
            bulk,
            task_message(
                BATCH_CHUNK_TASK,
                f"{batch_id}:{start}",
                bulk,
                [batch_id, start, min(start + size, len(good))],
                lim.hard_time_limit,
                lim.soft_time_limit,
            ),
        )
        for start in range(0, len(good), size)
    ]
    now = repr(time.time())
    window = extra.pop("completion_window", None) or request.args.get("completion_window") or "24h"
    extra.update(completion_window=window, expires_at=repr(float(now) + parse_duration(window, "completion_window")))
    fields = {
        "id": batch_id,
        "status": "in_progress" if messages else "completed",
        "created_at": now,
        "completed_at": None if messages else now,
        "total": str(len(items)),
        "completed": "0",
        "failed": str(len(errors)),
        "chunks": str(len(messages)),
        "chunks_left": str(len(messages)),
        "metadata": json.dumps(metadata) if metadata is not None else None,
        **extra,
        **hook,
        "owner": current_owner(),
        "model": served.alias,
    }
    caps = BatchCaps(bulk, lim.max_bulk_depth, _open_key(), lim.max_inflight_per_key, lim.result_ttl)
    if messages:  # a running batch counts against the key's quota until it ends
        batch_quota.reserve(batch_id, sum(map(len, good)) + sum(map(len, errors)), float(extra["expires_at"]))
    try:
        _refuse(*batch_store().create(batch_id, fields, good, errors, messages, caps), bulk)
    except Exception:  # refused by the caps (or Redis): the quota is given back
        batch_quota.release(batch_id)
        raise
    if hook and not messages:
        batch_store().notify(batch_id)
    response = Response(json.dumps(public_batch(strings(fields))), status=202, mimetype="application/json")
    response.headers["Location"] = f"/v1/batches/{batch_id}"
    return response


def _open_key() -> str:
    """The caller's batches that may still be running."""
    return batch_store().names.open_key(current_owner())


def _refuse(outcome: str, count: int, bulk: str) -> None:
    """429 when the model's bulk queue would pass `limits.max_bulk_depth` or the caller has too many open
    batches (both checked in the same step as the create)."""
    if outcome == "queue_full":
        raise QueueFull(f"the {bulk} queue holds {count} micro-batches; try again later", headers={"Retry-After": "30"})
    if outcome == "too_many":
        raise TooManyRequests(
            f"this key has {count} batches running", code="too_many_inflight", headers={"Retry-After": "30"}
        )
    if outcome == "busy":
        raise QueueFull("the batch queue is busy; try again", headers={"Retry-After": "1"})


@bp.get("/<batch_id>")
@doc(model=Batch, tags=("batches",))
def get_batch(batch_id: str) -> Response:
    """The batch: status and request counts."""
    return Response(json.dumps(public_batch(load_batch(batch_id))), mimetype="application/json")


@bp.get("/<batch_id>/results")
@doc(query=ResultsQuery, tags=("batches",))
def batch_results(batch_id: str) -> Response:
    """Finished lines as JSONL, while the batch runs; `after` skips lines already read."""
    record = load_batch(batch_id)
    raw = request.args.get("after", "0")
    if not COUNT.fullmatch(raw):
        raise Unprocessable("after must be a non-negative integer (lines already read)", param="after")
    after = min(int(raw), MAX_LINE_INDEX)  # Redis indexes are 64-bit; nothing lies beyond this anyway
    cap = current_services().settings.batches.max_results
    raw = request.args.get("limit", str(DEFAULT_RESULTS))
    if not COUNT.fullmatch(raw) or not 1 <= int(raw) <= cap:
        raise Unprocessable(f"limit must be an integer from 1 to {cap}", param="limit")
    lines = present_lines(batch_store().results(batch_id, after, int(raw)), record)
    body = "".join(line + "\n" for line in lines)
    return Response(body, mimetype="application/x-ndjson", headers={"X-Next-After": str(after + len(lines))})


@bp.post("/<batch_id>/cancel")
@doc(ok=202, model=Batch, tags=("batches",))
def cancel_batch(batch_id: str) -> Response:
    """Stop the rest of the batch."""
    load_batch(batch_id)
    before = batch_store().cancel(batch_id, current_owner())
    if before == "missing":
        raise missing("batch", batch_id, BATCH_ID_PREFIX)
    if before in TERMINAL:
        raise Conflict(f"batch {batch_id} already ended ({before})", code="batch_finished", param="id")
    return Response(json.dumps(public_batch(load_batch(batch_id))), status=202, mimetype="application/json")
