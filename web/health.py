"""Liveness, readiness and the served model."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from qwen_deploy import registry
from qwen_deploy.errors import ServiceUnavailable
from web import services
from web.openapi import ModelInfo, Status, doc

bp = Blueprint("health", __name__)


@bp.get("/livez")
@doc(model=Status, tags=("health",))
def livez() -> Response:
    """Liveness of the web process."""
    return jsonify(status="ok")


def _ready_worker() -> dict[str, Any]:
    """The newest ready generation worker, or a 503 that says why there is none."""
    svc = services()
    svc.redis.ping()
    found = registry.workers(svc.redis, svc.settings.key_prefix)
    ready = [w for w in found if w.get("state") == "ready"]
    if ready:
        return ready[0] | {"count": len(ready)}
    if found:
        raise ServiceUnavailable("a generation worker is loading its model", code="model_loading")
    raise ServiceUnavailable("no generation worker is running", code="no_worker")


@bp.get("/readyz")
@doc(model=Status, tags=("health",))
def readyz() -> Response:
    """Ready when Redis answers and a generation worker has its model loaded; else 503 with the reason."""
    worker = _ready_worker()
    return jsonify(status="ready", workers=worker["count"], model=worker["model"]["name"])


@bp.get("/v1/model")
@doc(model=ModelInfo, tags=("health",))
def model() -> Response:
    """The served model and the caps."""
    worker = _ready_worker()
    info, gen, lim = worker["model"], services().settings.generation, services().settings.limits
    caps = {"max_new_tokens": gen.max_new_tokens_cap, "default_max_new_tokens": gen.default_max_new_tokens,
            "max_prompt_tokens": gen.max_prompt_tokens, "max_stop_strings": gen.max_stop_strings,
            "hard_time_limit": lim.hard_time_limit, "soft_time_limit": lim.soft_time_limit,
            "generation_budget": lim.generation_budget}
    return jsonify(object="model", name=info["name"], revision=info.get("revision"), device=info.get("device"),
                   dtype=info.get("dtype"), parameters=info.get("parameters"), loaded_at=info.get("loaded_at"),
                   load_seconds=info.get("load_seconds"), workers=worker["count"], caps=caps)
