"""`GET /v1/models` and `GET /v1/models/{id}`: every served model under its public id (alias), with
its live workers and readiness."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify

from qwen_deploy.served import Served, served_models
from web.context import current_services
from web.openai_api.shapes import Model, ModelList
from web.openapi import doc
from web.schemas import pick_model
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
    }


@bp.get("")
@doc(model=ModelList, tags=("openai",))
def list_models() -> Response:
    """Every served model, the default first (its id is what `model` should name)."""
    found = workers()
    models = served_models(current_services().settings)
    return jsonify(object="list", data=[model_object(m.alias, m, found) for m in models])


@bp.get("/<path:name>")
@doc(model=Model, tags=("openai",))
def get_model(name: str) -> Response:
    """A served model by any of its names; 404 model_not_found otherwise."""
    served = pick_model(name, current_services().settings)
    return jsonify(model_object(name, served, workers()))
