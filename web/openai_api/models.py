"""`GET /v1/models` and `GET /v1/models/{id}`: the served model under its public id."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify

from web import services
from web.openai_api.translate import ModelNotFound, model_id, model_names

bp = Blueprint("openai_models", __name__, url_prefix="/v1/models")

STARTED = int(time.time())


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "qwen-deploy"}


@bp.get("")
def list_models() -> Response:
    """The served model (its id is what `model` should name)."""
    return jsonify(object="list", data=[model_object(model_id(services().settings))])


@bp.get("/<path:name>")
def get_model(name: str) -> Response:
    """The served model by any of its names; 404 model_not_found otherwise."""
    settings = services().settings
    if name not in model_names(settings):
        raise ModelNotFound(f"the model {name!r} does not exist; this server serves {model_id(settings)!r}",
                            param="model")
    return jsonify(model_object(name))
