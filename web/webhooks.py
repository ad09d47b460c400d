"""Webhook attempt logs: every delivery attempt of a job's or a batch's webhook."""

from __future__ import annotations

import json
from typing import Literal

from flask import Blueprint, Response
from pydantic import BaseModel

from web.openapi import doc
from web.services import load_batch, load_record, webhook_store

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


def _attempts(kind: str, subject: str) -> Response:
    data = webhook_store().attempts(kind, subject)
    return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")


@bp.get("/jobs/<job_id>/webhooks")
@doc(model=WebhookAttempts, tags=("jobs",))
def job_webhooks(job_id: str) -> Response:
    """The job's webhook delivery attempts, oldest first (response bodies are not kept); 404 for another
    key's job."""
    load_record(job_id)
    return _attempts("job", job_id)


@bp.get("/batches/<batch_id>/webhooks")
@doc(model=WebhookAttempts, tags=("batches",))
def batch_webhooks(batch_id: str) -> Response:
    """The batch's webhook delivery attempts, oldest first; 404 for another key's batch."""
    load_batch(batch_id)
    return _attempts("batch", batch_id)
