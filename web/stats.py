"""`GET /v1/stats`: the last 15 minutes of activity (the console's charts), from the sampled counters."""

from __future__ import annotations

import json
from typing import Literal

from flask import Blueprint, Response
from pydantic import BaseModel

from qwen_deploy.stats_history import samples, series
from web.context import current_services
from web.openapi import doc

bp = Blueprint("stats", __name__, url_prefix="/v1")


class StatsPoint(BaseModel):
    t: float
    tokens_per_second: float
    jobs_per_minute: float
    depth: dict[str, int]
    queue_seconds_p50: float | None
    run_seconds_p50: float | None


class Stats(BaseModel):
    object: Literal["list"]
    interval: float
    data: list[StatsPoint]


@bp.get("/stats")
@doc(model=Stats, tags=("jobs",))
def stats() -> Response:
    """Cluster-wide activity over the last 15 minutes, one point per sample (`worker.stats_interval`):
    tokens/s, generation and other jobs finished per minute, depth per queue, p50 queue wait and run time."""
    svc = current_services()
    body = {"object": "list", "interval": svc.settings.worker.stats_interval, "data": series(samples(svc.store))}
    return Response(json.dumps(body), mimetype="application/json")
