"""Liveness, readiness and the served model."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from qwen_deploy import registry
from qwen_deploy.errors import ServiceUnavailable
from qwen_deploy.model_load import LOAD_FAILED, MODEL_LOAD_FAILED
from qwen_deploy.served import Served, default_alias
from web.context import current_services
from web.openapi import ModelInfo, Status, doc
from web.schemas import pick_model
from web.services import model_workers, workers

bp = Blueprint("health", __name__)


@bp.get("/livez")
@doc(model=Status, tags=("health",))
def livez() -> Response:
    """Liveness of the web process."""
    return jsonify(status="ok")


REASONS = {"model_loading": "a generation worker is loading its model", "no_worker": "no generation worker is running"}


def _ready_worker(served: Served | None = None) -> dict[str, Any]:
    """The newest ready generation worker (of `served`, else of any model), or a 503 that says why there
    is none."""
    svc = current_services()
    svc.redis.ping()
    found = workers()
    if served is not None:
        state = model_workers(found, served)
        if state["newest"]:
            return state["newest"] | {"count": state["ready"]}
        message = state.get("error") or f"{REASONS[state['reason']]} for the model {served.alias!r}"
        raise ServiceUnavailable(message, code=state["reason"], param="model")
    ready = [w for w in found if w.get("state") == "ready"]
    if ready:
        return ready[0] | {"count": len(ready)}
    failed = [w for w in found if w.get("state") == LOAD_FAILED]
    if failed and len(failed) == len(found):  # every worker's model failed to load: say why
        raise ServiceUnavailable(registry.load_reason(failed[0]), code=MODEL_LOAD_FAILED)
    if found:
        raise ServiceUnavailable(REASONS["model_loading"], code="model_loading")
    raise ServiceUnavailable(REASONS["no_worker"], code="no_worker")


@bp.get("/readyz")
@doc(model=Status, tags=("health",))
def readyz() -> Response:
    """Ready when Redis answers and a generation worker has its model loaded (with `?model=`: a worker of
    that model); else 503 with the reason (`model_load_failed`: the model could not be loaded, and why)."""
    name = request.args.get("model")
    served = pick_model(name, current_services().settings) if name is not None else None
    worker = _ready_worker(served)
    return jsonify(
        status="ready",
        workers=worker["count"],
        model=worker.get("alias") or default_alias(current_services().settings),  # never a filesystem path
        **({"alias": served.alias} if served else {}),
    )


@bp.get("/v1/model")
@doc(model=ModelInfo, tags=("health",))
def model() -> Response:
    """The served model and the caps."""
    worker = _ready_worker()
    info, gen, lim = worker["model"], current_services().settings.generation, current_services().settings.limits
    caps = {
        "max_new_tokens": gen.max_new_tokens_cap,
        "default_max_new_tokens": gen.default_max_new_tokens,
        "max_prompt_tokens": gen.max_prompt_tokens,
        "max_stop_strings": gen.max_stop_strings,
        "hard_time_limit": lim.hard_time_limit,
        "soft_time_limit": lim.soft_time_limit,
        "generation_budget": lim.generation_budget,
    }
    return jsonify(
        object="model",
        name=info["name"],
        revision=info.get("revision"),
        device=info.get("device"),
        dtype=info.get("dtype"),
        parameters=info.get("parameters"),
        loaded_at=info.get("loaded_at"),
        load_seconds=info.get("load_seconds"),
        workers=worker["count"],
        caps=caps,
    )
