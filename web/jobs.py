"""Job routes: submit, read (with long-poll), stream (SSE), cancel, and synchronous generate."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, has_request_context, request, stream_with_context

from qwen_deploy.config import Settings
from qwen_deploy.errors import Conflict, GatewayTimeout, Gone, NotFound, Unprocessable
from qwen_deploy.jobs import JOB_ID_PREFIX, TERMINAL, id_time, new_job_id, public_job, valid_id
from qwen_deploy.lifecycle import current, estimate, with_positions
from qwen_deploy.logs import event
from qwen_deploy.queues import GENERATE_TASK, task_message
from qwen_deploy.served import find_model
from qwen_deploy.webhook_store import WebhookStore
from qwen_deploy.webhooks import check_request
from web import services
from web.auth import current_owner
from web.errors import refused
from web.job_options import JobOptions, body_options
from web.openapi import Job, SubmitHeaders, WaitQuery, doc
from web.schemas import JobCreate, parse_job, read_json
from web.stream_slots import counted, open_stream

bp = Blueprint("jobs", __name__, url_prefix="/v1")
log = logging.getLogger(__name__)

SSE_KEEPALIVE_S = 15.0
STREAM_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")  # 64-bit parts
SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces (like Stripe's 255)


def request_hash(req: Any, canonical: str | None = None) -> str:
    """A hash of a validated request (or of its `canonical` JSON), stored with its idempotency key."""
    canonical = canonical if canonical is not None else json.dumps(req, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def check_idempotency_key(key: str | None) -> str | None:
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise Unprocessable("Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
                            code="invalid_idempotency_key", param="Idempotency-Key")
    return key


def enqueue(kind: str, task: str, queue: str, req: dict[str, Any], limits: tuple[float, float],
            idempotency_key: str | None, retry_after: int | None = None, engine: bool = False,
            model: str | None = None, options: JobOptions | None = None, **extra: str) -> tuple[dict[str, Any], bool]:
    """Record and enqueue a job in one Redis round trip; return (job object, replayed). A generation job
    (`engine`) for `model` goes onto that model's pending set; while no live worker serves it, only
    `limits.max_queued_unserved` such jobs are accepted."""
    svc = services()
    job_id = new_job_id()
    owner = current_owner()
    message = task_message(task, job_id, queue, [job_id], *limits)
    options = options or JobOptions()
    deadline = options.deadline()
    stored = json.dumps(req, sort_keys=True, default=str)  # also what the idempotency hash covers
    fields = {"type": kind, "request": stored, "created_at": repr(time.time()),
              **({"model": model} if model else {}), **options.fields(), **extra}
    route = request.path if has_request_context() else kind
    same_body = model in (None, svc.store.default_model)  # another model: another body
    body_hash = request_hash(req, stored) if same_body else request_hash({**req, "model": model})
    result = svc.store.submit(job_id, queue, message, fields, svc.settings.limits.max_queue_depth,
                              check_idempotency_key(idempotency_key), owner=owner, route=route,
                              body_hash=body_hash, max_inflight=svc.settings.limits.max_inflight_per_key,
                              engine=engine, model=model,
                              unserved_cap=svc.settings.limits.max_queued_unserved if engine else None,
                              priority=options.priority, deadline=deadline, fair_cost=fair_cost(req, svc.settings))
    if result.status == "ok" and "output" in extra.get("webhook_events_filter", ""):
        WebhookStore(svc.redis, svc.settings).watch_output(job_id)
    refusal = refused(result, queue, model, retry_after)
    if refusal is not None:
        raise refusal
    if result.status == "duplicate":
        return load_job(result.job_id), True
    event(log, "job.submitted", id=job_id, type=kind, queue=queue, max_new_tokens=extra.get("max_new_tokens"))
    job = public_job({"id": job_id, "status": "queued", "queue": queue, "priority": options.priority,
                      **({"deadline": repr(deadline)} if deadline else {}), **fields})
    if result.position is not None:
        job.update(queue_position=result.position, estimated_start_seconds=estimate(result.position, result.rate))
    return job, False


def fair_cost(req: dict[str, Any], settings: Settings) -> float:
    """Seconds of its key's virtual clock a generation job takes (0: no fair queueing)."""
    rate = settings.limits.fair_tokens_per_second
    tokens = int(req.get("max_new_tokens") or 0) * int(req.get("n") or 1)
    return tokens / rate if rate and tokens else 0.0


def submit_job(body: Any, idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
    """Validate and enqueue a generation job."""
    req = parse_job(body, services().settings)
    hook = check_request(body.get("webhook"), body.get("webhook_events_filter"), services().settings)
    return submit_request(req, idempotency_key, body_options(body), **hook)


def submit_request(req: dict[str, Any], idempotency_key: str | None, options: JobOptions | None = None,
                   **extra: str) -> tuple[dict[str, Any], bool]:
    """Enqueue an already validated generation request (see parse_job) on its model's interactive queue."""
    settings = services().settings
    lim, req = settings.limits, dict(req)
    served = find_model(settings, req.pop("model", None))
    if served is None:  # parse_job checked it
        raise NotFound("no such model", code="model_not_found", param="model")
    return enqueue("generation", GENERATE_TASK, served.interactive, req, (lim.hard_time_limit, lim.soft_time_limit),
                   idempotency_key, engine=True, model=served.alias, options=options,
                   max_new_tokens=str(req["max_new_tokens"]), **extra)


def load_record(job_id: str) -> dict[str, str]:
    """The caller's job record: 404 for a malformed id or another owner's job, 410 once expired."""
    if not valid_id(job_id):
        raise NotFound("no job with this id", param="id")
    record = services().store.get(job_id)
    if record is None:
        raise missing("job", job_id)
    if not owns(record):
        raise NotFound(f"no job with id {job_id}", param="id")
    return record


def owns(record: dict[str, str]) -> bool:
    """Whether the caller owns a job or batch record (records without an owner are "anonymous")."""
    return record.get("owner", "anonymous") == current_owner()


def load_job(job_id: str) -> dict[str, Any]:
    """The caller's job object; a queued one past its deadline is closed first, one still queued gets
    its queue position."""
    return with_positions(services().store, [public_job(current(services().store, load_record(job_id)))])[0]


def missing(kind: str, any_id: str, prefix: str = JOB_ID_PREFIX) -> Exception:
    """410 for a well-formed id older than the result TTL, else 404."""
    if not valid_id(any_id, prefix):
        return NotFound(f"no {kind} with this id", param="id")
    created = id_time(any_id, prefix)
    if created is not None and created + services().settings.limits.result_ttl <= time.time():
        return Gone(f"{kind} {any_id} has expired", param="id")
    return NotFound(f"no {kind} with id {any_id}", param="id")


def wait_for(job_id: str, seconds: float) -> dict[str, Any]:
    """The job once terminal, or as it stands when `seconds` have passed."""
    store = services().store
    job = load_job(job_id)
    deadline = time.monotonic() + seconds
    last = "0-0"
    while job["status"] not in TERMINAL:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        events = store.read_events(job_id, last, int(min(remaining, 10.0) * 1000))
        if events:
            last = events[-1][0]
        if not events or any(ev.get("type") == "done" for _, ev in events):
            job = load_job(job_id)
    return job


def _job_response(job: dict[str, Any], status: int = 200, **headers: str) -> Response:
    response = Response(json.dumps(job), status=status, mimetype="application/json")
    response.headers.update(headers)
    return response


@bp.post("/jobs")
@doc(ok=202, model=Job, json=JobCreate, headers=SubmitHeaders, tags=("jobs",))
def create_job() -> Response:
    """Submit a generation job (202); `Idempotency-Key` returns the earlier job for a repeated key."""
    job, replayed = submit_job(read_json(request), request.headers.get("Idempotency-Key"))
    headers = {"Location": f"/v1/jobs/{job['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return _job_response(job, 202, **headers)


@bp.get("/jobs/<job_id>")
@doc(model=Job, query=WaitQuery, tags=("jobs",))
def get_job(job_id: str) -> Response:
    """The job; with `wait`, block until it is terminal or the seconds pass."""
    raw = request.args.get("wait")
    if raw is None:
        return _job_response(load_job(job_id))
    limit = services().settings.limits.max_wait
    wait = float(raw) if SECONDS.fullmatch(raw) else -1.0  # float() would take "nan", "1_0" and "١"
    if not 0 <= wait <= limit:
        raise Unprocessable(f"wait must be a number of seconds from 0 to {limit:g}", param="wait")
    return _job_response(wait_for(job_id, wait))


@bp.post("/jobs/<job_id>/cancel")
@doc(ok=202, model=Job, tags=("jobs",))
def cancel_job(job_id: str) -> Response:
    """Cancel: a queued job at once, a running one within ~50 ms (keeping its partial text)."""
    load_record(job_id)  # 404 for another owner's job (the owner of a job never changes)
    outcome = services().store.cancel(job_id)
    if outcome == "missing":
        raise missing("job", job_id)
    if outcome.startswith("terminal:"):
        status = outcome.removeprefix("terminal:")
        raise Conflict(f"job {job_id} already finished ({status})", code="job_finished", param="id")
    job = load_job(job_id)
    if outcome == "canceling":
        job["status"] = "canceling"
    return _job_response(job, 202)


@bp.get("/jobs/<job_id>/events")  # documented in web/openapi.py: spectree's wrapper would buffer the stream
def job_events(job_id: str) -> Response:
    """Server-sent events: `status`, `token` (text deltas) and a final `done` with the job."""
    load_job(job_id)  # 404/410 before the stream starts
    start = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0-0"
    if not STREAM_ID.fullmatch(start):
        raise Unprocessable("Last-Event-ID must be an event id from this stream (like 1795760951281-0)",
                            param="Last-Event-ID")
    body = stream_with_context(counted(_sse(job_id, start), open_stream()))
    return Response(body, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse_event(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def _sse(job_id: str, last: str) -> Iterator[str]:
    store = services().store
    deadline = time.monotonic() + services().settings.limits.max_stream
    yield ": stream of job events\n\n"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:  # the client reconnects with Last-Event-ID
            yield "event: timeout\ndata: {}\n\n"
            return
        events = store.read_events(job_id, last, int(min(SSE_KEEPALIVE_S, remaining) * 1000))
        if not events:
            record = store.get(job_id)
            if record is None:
                return
            if record.get("status") in TERMINAL:  # events expired or never written
                yield _sse_event("done", public_job(record))
                return
            yield ": keep-alive\n\n"
            continue
        for event_id, ev in events:
            last = event_id
            kind = ev.get("type")
            if kind == "token":  # samples after the first (n > 1) carry their index
                data = {"text": ev.get("text", ""), "tokens": int(ev.get("tokens", 0))}
                yield _sse_event("token", {**data, "index": int(ev["index"])} if ev.get("index") else data, event_id)
            elif kind == "status":
                yield _sse_event("status", {"status": ev.get("status"), "attempt": int(ev.get("attempt", 1))},
                                 event_id)
            elif kind == "done":
                yield _sse_event("done", load_job(job_id), event_id)
                return


@bp.post("/generate")
@doc(model=Job, json=JobCreate, headers=SubmitHeaders, tags=("jobs",))
def generate_sync() -> Response:
    """Submit and wait for the finished job (504 past the hard time limit)."""
    job, _ = submit_job(read_json(request), request.headers.get("Idempotency-Key"))
    limits = services().settings.limits
    job = wait_for(job["id"], limits.hard_time_limit + 5.0)
    if job["status"] not in TERMINAL:
        raise GatewayTimeout(f"job {job['id']} did not finish within {limits.hard_time_limit:g} s; "
                             f"poll /v1/jobs/{job['id']}", param="id", headers={"Location": f"/v1/jobs/{job['id']}"})
    return _job_response(job, 200)


def iter_job_events(job_id: str, last: str = "0-0", idle_s: float = SSE_KEEPALIVE_S) -> Iterator[tuple[str, Any]]:
    """(kind, data) from a job's event stream: token/status events, "idle" after idle_s, and a final "done" job."""
    store = services().store
    while True:
        events = store.read_events(job_id, last, int(idle_s * 1000))
        if not events:
            record = store.get(job_id)
            if record is None:
                return
            if record.get("status") in TERMINAL:  # events expired or never written
                yield "done", public_job(record)
                return
            yield "idle", None
            continue
        for event_id, ev in events:
            last = event_id
            if ev.get("type") == "done":
                yield "done", load_job(job_id)
                return
            yield ev.get("type", ""), ev
