"""Webhook attempt logs: every delivery attempt of a job's or a batch's webhook."""

from __future__ import annotations

import json
from typing import Literal

from flask import Blueprint, Response
from pydantic import BaseModel

from qwen_deploy.batches import BATCH_ID_PREFIX
from qwen_deploy.keys import BatchKeys
from web.context import current_services
from web.openapi import doc
from web.services import missing, webhook_store

bp = Blueprint("webhooks", __name__, url_prefix="/v1")


class WebhookAttempt(BaseModel):
    time: float
    event: str
    webhook_id: str
    attempt: int
    status_code: int | None = None
    duration_ms: float
    error: str | None = None


class WebhookAttempts(BaseModel):
    object: Literal["list"]
    data: list[WebhookAttempt]


def _attempts(kind: str, subject: str, exists: bool, prefix: str) -> Response:
    if not exists:
        raise missing(kind, subject, prefix)
    data = webhook_store().attempts(kind, subject)
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")


@bp.get("/jobs/<job_id>/webhooks")
@doc(model=WebhookAttempts, tags=("jobs",))
def job_webhooks(job_id: str) -> Response:
    """The job's webhook delivery attempts, oldest first (response bodies are not kept)."""
    svc = current_services()
    return _attempts("job", job_id, bool(svc.redis.exists(svc.store.key(job_id))), "job_")


@bp.get("/batches/<batch_id>/webhooks")
@doc(model=WebhookAttempts, tags=("batches",))
def batch_webhooks(batch_id: str) -> Response:
    """The batch's webhook delivery attempts, oldest first."""
    svc = current_services()
    exists = bool(svc.redis.exists(BatchKeys(svc.settings.key_prefix).key(batch_id)))
    return _attempts("batch", batch_id, exists, BATCH_ID_PREFIX)
