"""Actions on jobs beside submit/read/cancel: retry, the queue overview, and the admin purge.

- `POST /v1/jobs/{id}/retry`: a new job with the original's request, priority, relative deadline and
  webhook, owned by the same owner and linked by `retry_of` (404 for another owner's job, 409 while
  the original is not terminal, or once its request is no longer kept: each key's ended jobs keep their
  requests up to 64 MiB in all, newest first; generation jobs only).
- `GET /v1/queues`: how many jobs wait in each queue and how many workers are ready (the console).
- `POST /v1/queues/{name}/purge` (admin keys): every queued job of the queue ends `canceled` with
  error `purged`; answers the count.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from flask import Blueprint, Response
from pydantic import BaseModel

from qwen_deploy.errors import Conflict, NotFound
from qwen_deploy.jobs import TERMINAL
from qwen_deploy.lifecycle import purge
from qwen_deploy.lua import KEPT_REQUEST_BYTES
from qwen_deploy.queues import CONVERT, Lane
from qwen_deploy.requests import GenerationRequest
from web.auth import require_admin
from web.context import current_services
from web.job_options import JobOptions
from web.openapi import Job, doc
from web.services import load_record, submit_request, workers

bp = Blueprint("job_actions", __name__, url_prefix="/v1")
PURGEABLE = (Lane.INTERACTIVE.queue, CONVERT)


class QueueInfo(BaseModel):
    name: str
    depth: int


class Queues(BaseModel):
    object: Literal["list"]
    data: list[QueueInfo]
    workers: int


class Purged(BaseModel):
    object: Literal["queue.purged"]
    queue: str
    purged: int


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


@bp.post("/jobs/<job_id>/retry")
@doc(ok=201, model=Job, tags=("jobs",))
def retry_job(job_id: str) -> Response:
    """A new job with the same request (RunPod's `/retry`), linked by `retry_of`; 409 until the original ends."""
    record = load_record(job_id)
    if record.get("status") not in TERMINAL:
        raise Conflict(
            f"job {job_id} is {record.get('status')}; retry it once it has ended", code="job_not_finished", param="id"
        )
    if record.get("type", "generation") != "generation":
        raise Conflict("only generation jobs can be retried", code="not_retryable", param="id")
    if "request" not in record:  # each key's ended jobs keep their requests up to a bound, newest first
        raise Conflict(
            f"job {job_id}'s request is no longer kept (a key's ended jobs keep theirs up to "
            f"{KEPT_REQUEST_BYTES} bytes, newest first); submit it again",
            code="request_not_kept",
            param="id",
        )
    seconds = record.get("deadline_seconds")
    options = JobOptions(record.get("priority") or "normal", float(seconds) if seconds else None)
    hook = {k: record[k] for k in ("webhook", "webhook_events_filter") if record.get(k)}
    strict = current_services().settings.generation.strict_requests
    req = GenerationRequest.from_dict(json.loads(record["request"]), strict=strict)
    req.model = record.get("model") or None
    job, _ = submit_request(req, None, options, retry_of=job_id, **hook)
    response = _json(job, 201)
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return response


@bp.get("/queues")
@doc(model=Queues, tags=("jobs",))
def queues() -> Response:
    """Jobs waiting per queue (interactive: the engine's pending set) and the ready workers."""
    svc = current_services()
    pipe = svc.redis.pipeline(transaction=False)
    pipe.zcard(svc.store.pending_key())
    pipe.llen(svc.store.queue_key(Lane.BULK.queue))
    pipe.llen(svc.store.queue_key(CONVERT))
    interactive, bulk, convert = pipe.execute()
    ready = [w for w in workers() if w.get("state") == "ready"]
    data = [
        {"name": Lane.INTERACTIVE.queue, "depth": interactive},
        {"name": Lane.BULK.queue, "depth": bulk},
        {"name": CONVERT, "depth": convert},
    ]
    return _json({"object": "list", "data": data, "workers": len(ready)})


@bp.post("/queues/<name>/purge")
@doc(model=Purged, tags=("admin",))
def purge_queue(name: str) -> Response:
    """Admin: end every queued job of `interactive` or `convert` (`canceled`, error `purged`)."""
    require_admin()
    if name not in PURGEABLE:
        raise NotFound(f"no purgeable queue {name!r}; one of {', '.join(PURGEABLE)}", param="name")
    count = purge(current_services().store, name, pending=name == Lane.INTERACTIVE.queue)
    return _json({"object": "queue.purged", "queue": name, "purged": count})
