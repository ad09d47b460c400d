"""The naive baseline for bench/submit_bench.py: a Flask endpoint that calls Celery's `send_task`.

    REDIS_URL=redis://127.0.0.1:6379/0 gunicorn -k gevent bench.naive_app:app

No validation beyond "is it JSON", no job record, no idempotency, no queue cap: what a first
version of this service would be. Tasks go to the `naive` queue, which no worker reads.
"""

from __future__ import annotations

import os
import uuid

from celery import Celery
from flask import Flask, jsonify, request

celery = Celery("naive", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
celery.conf.update(task_serializer="json", accept_content=["json"], task_default_queue="naive")
app = Flask(__name__)


@app.post("/v1/jobs")
def create_job():  # type: ignore[no-untyped-def]
    body = request.get_json()
    job_id = uuid.uuid4().hex
    celery.send_task("tasks.generate", args=[body], task_id=job_id, queue="naive")
    return jsonify(id=job_id, status="queued"), 202
