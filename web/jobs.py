"""Job routes: submit, read (with long-poll), stream (SSE), cancel, and synchronous generate."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request, stream_with_context

from qwen_deploy.errors import Conflict, GatewayTimeout, Unprocessable
from qwen_deploy.job_records import public_job
from qwen_deploy.jobs import TERMINAL
from qwen_deploy.jsontext import dumpb
from web.auth import current_owner
from web.context import current_services
from web.openapi import Job, SubmitHeaders, WaitQuery, doc
from web.schemas import JobCreate, read_json
from web.services import SSE_KEEPALIVE_S, load_job, load_record, missing, submit_job, wait_for
from web.stream_slots import counted, open_stream

bp = Blueprint("jobs", __name__, url_prefix="/v1")
log = logging.getLogger(__name__)

STREAM_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")  # 64-bit parts
SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")


class _JobResponse(Response):
    """A job object (200 or 202): its headers are final as set (an ASCII `Location`, a known length), so
    werkzeug's per-response pass over them (IRI quoting, fixes for bodiless statuses) is skipped. Kept by its
    figure: 8.4 us per submit in-process, and with it and the raw body read replaced a submit cost ~9 % more CPU
    end to end (bench/web_fastpaths_bench.py, bench/submit_bench.py; docs/RELIABILITY.md)."""

    def get_wsgi_headers(self, environ: Any) -> Any:
        return self.headers


def _job_response(job: dict[str, Any], status: int = 200, **headers: str) -> Response:
    return _JobResponse(dumpb(job), status=status, headers=headers, content_type="application/json")


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
    limit = current_services().settings.limits.max_wait
    wait = float(raw) if SECONDS.fullmatch(raw) else -1.0  # float() would take "nan", "1_0" and "١"
    if not 0 <= wait <= limit:
        raise Unprocessable(f"wait must be a number of seconds from 0 to {limit:g}", param="wait")
    return _job_response(wait_for(job_id, wait))


@bp.post("/jobs/<job_id>/cancel")
@doc(ok=202, model=Job, tags=("jobs",))
def cancel_job(job_id: str) -> Response:
    """Cancel: a queued job at once, a running one within ~50 ms (keeping its partial text)."""
    load_record(job_id)  # 404 for another owner's job (the owner of a job never changes)
    outcome = current_services().store.cancel(job_id, current_owner())
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
        raise Unprocessable(
            "Last-Event-ID must be an event id from this stream (like 1795760951281-0)", param="Last-Event-ID"
        )
    body = stream_with_context(counted(_sse(job_id, start), open_stream()))
    return Response(
        body, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _sse_event(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def _sse(job_id: str, last: str) -> Iterator[str]:
    store = current_services().store
    deadline = time.monotonic() + current_services().settings.limits.max_stream
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
                yield _sse_event("status", {"status": ev.get("status"), "attempt": int(ev.get("attempt", 1))}, event_id)
            elif kind == "done":
                yield _sse_event("done", load_job(job_id), event_id)
                return


@bp.post("/generate")
@doc(model=Job, json=JobCreate, headers=SubmitHeaders, tags=("jobs",))
def generate_sync() -> Response:
    """Submit and wait for the finished job (504 past the hard time limit)."""
    job, _ = submit_job(read_json(request), request.headers.get("Idempotency-Key"))
    limits = current_services().settings.limits
    job = wait_for(job["id"], limits.hard_time_limit + 5.0)
    if job["status"] not in TERMINAL:
        raise GatewayTimeout(
            f"job {job['id']} did not finish within {limits.hard_time_limit:g} s; poll /v1/jobs/{job['id']}",
            param="id",
            headers={"Location": f"/v1/jobs/{job['id']}"},
        )
    return _job_response(job, 200)
