"""Submitting jobs: the one path every route that creates a job takes (record + enqueue in one round trip)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from flask import has_request_context, request

from qwen_deploy.config import Settings
from qwen_deploy.errors import Unprocessable
from qwen_deploy.job_records import new_job_id, public_job
from qwen_deploy.jsontext import dumps
from qwen_deploy.lifecycle import estimate
from qwen_deploy.logs import event
from qwen_deploy.queues import GENERATE_TASK, task_message
from qwen_deploy.requests import GenerationRequest
from qwen_deploy.webhooks import check_request
from web.auth import current_owner
from web.context import current_services
from web.errors import refused
from web.job_options import JobOptions, body_options
from web.schemas import check_task, parse_job, pick_model
from web.services.records import load_job

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces (like Stripe's 255)


_SORTED = json.JSONEncoder(sort_keys=True, default=str)  # json.dumps(req, sort_keys=True, default=str), built once


def request_hash(req: Any) -> str:
    """A hash of a validated request, stored with its idempotency key."""
    return hashlib.sha256(_SORTED.encode(req).encode()).hexdigest()[:32]


def check_idempotency_key(key: str | None) -> str | None:
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise Unprocessable(
            "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
            code="invalid_idempotency_key",
            param="Idempotency-Key",
        )
    return key


def enqueue(
    kind: str,
    task: str,
    queue: str,
    req: dict[str, Any],
    limits: tuple[float, float],
    idempotency_key: str | None,
    *,
    retry_after: int | None = None,
    engine: bool = False,
    model: str | None = None,
    options: JobOptions | None = None,
    extra: Mapping[str, str] | None = None,
    fair: float = 0.0,
) -> tuple[dict[str, Any], bool]:
    """Record and enqueue a job in one Redis round trip; return (job object, replayed). A generation job
    (`engine`) for `model` goes onto that model's pending set; while no live worker serves it, only
    `limits.max_queued_unserved` such jobs are accepted. `extra`: more record fields (webhook, retry_of...);
    `fair`: the job's cost on its key's fair-queueing clock (see fair_cost)."""
    extra = extra or {}
    svc = current_services()
    job_id = new_job_id()
    owner = current_owner()
    message = task_message(task, job_id, queue, [job_id], *limits)
    options = options or JobOptions()
    deadline = options.deadline()
    fields = {
        "type": kind,
        "request": dumps(req),
        "created_at": repr(time.time()),
        **({"model": model} if model else {}),
        **options.fields(),
        **extra,
    }
    route = request.path if has_request_context() else kind
    same_body = model in (None, svc.store.default_model)  # another model: another body
    body_hash = request_hash(req if same_body else {**req, "model": model})
    result = svc.store.submit(
        job_id,
        queue,
        message,
        fields,
        svc.settings.limits.max_queue_depth,
        check_idempotency_key(idempotency_key),
        owner=owner,
        route=route,
        body_hash=body_hash,
        max_inflight=svc.settings.limits.max_inflight_per_key,
        engine=engine,
        model=model,
        unserved_cap=svc.settings.limits.max_queued_unserved if engine else None,
        priority=options.priority,
        deadline=deadline,
        fair_cost=fair,
    )
    if result.status == "ok" and "output" in extra.get("webhook_events_filter", ""):
        svc.webhooks.watch_output(job_id)
    refusal = refused(result, queue, model, retry_after)
    if refusal is not None:
        raise refusal
    if result.status == "duplicate":
        return load_job(result.job_id), True
    event(log, "job.submitted", id=job_id, type=kind, queue=queue, max_new_tokens=extra.get("max_new_tokens"))
    job = public_job(
        {
            "id": job_id,
            "status": "queued",
            "queue": queue,
            "priority": options.priority,
            **({"deadline": repr(deadline)} if deadline else {}),
            **fields,
        }
    )
    if result.position is not None:
        job.update(
            queue_position=result.position, estimated_start_seconds=estimate(result.position, result.rate, result.free)
        )
    return job, False


def fair_cost(req: GenerationRequest, settings: Settings) -> float:
    """Seconds of its key's virtual clock a generation job takes (0: no fair queueing): the tokens it may
    generate plus an estimate of its prompt's (a character in four, at most the `max_prompt_tokens` kept)."""
    rate = settings.limits.fair_tokens_per_second
    texts = [req.prompt] + [m.get("content") for m in req.messages or () if isinstance(m, dict)]
    chars = sum(len(t) if isinstance(t, str) else len(dumps(t)) for t in texts if t)
    prompt = min(chars // 4, settings.generation.max_prompt_tokens)
    tokens = req.max_new_tokens * (req.n or 1) + prompt
    return tokens / rate if rate and tokens else 0.0


def submit_job(body: Any, idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
    """Validate and enqueue a generation job."""
    settings = current_services().settings
    req = parse_job(body, settings)
    hook = check_request(body.get("webhook"), body.get("webhook_events_filter"), settings)
    return submit_request(req, idempotency_key, body_options(body), **hook)


def submit_request(
    req: GenerationRequest, idempotency_key: str | None, options: JobOptions | None = None, **extra: str
) -> tuple[dict[str, Any], bool]:
    """Enqueue an already validated generation request (see parse_job) on its model's interactive queue."""
    settings = current_services().settings
    lim = settings.limits
    served = pick_model(req.model, settings)  # parse_job checked it: a configured or registered model
    check_task(served, req)
    return enqueue(
        "generation",
        GENERATE_TASK,
        served.interactive,
        req.stored(model=False),
        (lim.hard_time_limit, lim.soft_time_limit),
        idempotency_key,
        engine=True,
        model=served.alias,
        options=options,
        extra={"max_new_tokens": str(req.max_new_tokens), **extra},
        fair=fair_cost(req, settings),
    )
