"""`GET /v1/models` and `GET /v1/models/{id}`: every served model under its public id (alias), with
its live workers and readiness."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify

from qwen_deploy import registry
from qwen_deploy.adapters import registered
from qwen_deploy.runtime_models import runtime_models
from qwen_deploy.served import Served, served_models
from web.context import current_services
from web.openai_api.shapes import Model, ModelList
from web.openapi import doc
from web.schemas import pick_target
from web.services import model_workers, workers

bp = Blueprint("openai_models", __name__, url_prefix="/v1/models")

STARTED = int(time.time())


def model_object(name: str, served: Served, found: list[dict[str, Any]]) -> dict[str, Any]:
    state = model_workers(found, served)
    return {
        "id": name,
        "object": "model",
        "created": STARTED,
        "owned_by": "qwen-deploy",
        "default": served.default,
        "workers": state["live"],
        "ready": state["reason"] is None,
        "reason": state["reason"],
        "task": served.model.task,
        "revisions": revisions(found, served),
    }


def revisions(found: list[dict[str, Any]], served: Served) -> list[dict[str, Any]]:
    """The weights each live worker of the model serves: path, the reload that rolled it there (None: the
    configured weights) and since when."""
    mine = registry.by_model(found, served.alias, served.default)
    return [{"worker": w["name"], **w["revision"]} for w in mine if w.get("revision")]


def adapter_object(name: str, base: dict[str, Any]) -> dict[str, Any]:
    """A LoRA adapter as vLLM lists it: its own id, `parent` the base model's id; ready when its base is."""
    return {**base, "id": name, "default": False, "parent": base["id"]}


@bp.get("")
@doc(model=ModelList, tags=("openai",))
def list_models() -> Response:
    """Every served model, the default first (its id is what `model` should name), each followed by its LoRA
    adapters (`parent`: the model's id), then the models registered at runtime (`export --serve-as`)."""
    found = workers()
    svc = current_services()
    data = []
    for m in served_models(svc.settings):
        base = model_object(m.alias, m, found)
        data.append(base)
        data.extend(adapter_object(name, base) for name in registered(svc.redis, svc.settings, m))
    data.extend(model_object(m.alias, m, found) for m in runtime_models(svc.redis, svc.settings))
    return jsonify(object="list", data=data)


@bp.get("/<path:name>")
@doc(model=Model, tags=("openai",))
def get_model(name: str) -> Response:
    """A served model (or LoRA adapter) by any of its names; 404 model_not_found otherwise."""
    served, adapter = pick_target(name, current_services().settings)
    base = model_object(served.alias if adapter else name, served, workers())
    return jsonify(adapter_object(adapter, base) if adapter else base)
