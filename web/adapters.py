"""vLLM's runtime LoRA API: `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` (admin keys).

A load checks the adapter's files against its base model (a 422 says why it cannot serve), then registers it
in Redis and bumps the adapters' version: every worker of that model picks the change up between engine steps
and loads it. An unload removes it the same way; requests naming it get 404 `model_not_found` from then on.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from qwen_deploy.adapters import AdapterError, adapter_name_taken, find_adapter, fitting_model, register
from qwen_deploy.errors import BadRequest, ModelNotFound, Unprocessable
from qwen_deploy.paths import confine
from qwen_deploy.sections import ALIAS_PATTERN
from qwen_deploy.served import Served
from web.context import current_services
from web.openapi import doc
from web.schemas import read_json, validation_error

bp = Blueprint("adapters", __name__, url_prefix="/v1")


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr = Field(pattern=ALIAS_PATTERN, description="the adapter's id in `model` fields")
    lora_path: StrictStr = Field(description="a PEFT adapter directory, relative to paths.models_root")
    model: StrictStr | None = Field(None, description="the base model's id (default: the one the adapter fits)")


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr = Field(max_length=64)


class AdapterObject(BaseModel):
    id: str
    object: str = "model"
    parent: str = Field(description="the base model's id")
    status: str


def _parse(schema: type[BaseModel]) -> Any:
    try:
        return schema.model_validate(read_json(request))
    except ValidationError as exc:
        raise validation_error(exc) from None


def _target(path: Any, named: str | None) -> Served:
    """The base model the adapter is for: the one named, else the first it fits (422 saying why when none)."""
    try:
        return fitting_model(path, current_services().settings, named)
    except LookupError as exc:
        raise ModelNotFound(str(exc), param="model") from None
    except AdapterError as exc:
        raise Unprocessable(str(exc), code="invalid_adapter", param="lora_path") from None


@bp.post("/load_lora_adapter")
@doc(model=AdapterObject, json=LoadAdapter, tags=("models",))
def load_adapter() -> Response:
    """Register a LoRA adapter at runtime; every worker of its base model loads it."""
    svc = current_services()
    req = _parse(LoadAdapter)
    settings = svc.settings
    if adapter_name_taken(svc.redis, settings, req.lora_name):
        raise BadRequest(
            f"the name {req.lora_name!r} is already served (unload it first)", code="adapter_exists", param="lora_name"
        )
    path = confine(settings.paths.models_root, req.lora_path, "lora_path", must_exist=True)
    served = _target(path, req.model)
    register(svc.redis, settings, served, req.lora_name, path)
    return jsonify(id=req.lora_name, object="model", parent=served.alias, status="loaded")


@bp.post("/unload_lora_adapter")
@doc(model=AdapterObject, json=UnloadAdapter, tags=("models",))
def unload_adapter() -> Response:
    """Remove a LoRA adapter loaded at runtime; requests naming it get 404 from then on."""
    svc = current_services()
    name = _parse(UnloadAdapter).lora_name
    settings = svc.settings
    served = find_adapter(svc.redis, settings, name)
    if served is None:
        raise ModelNotFound(f"no adapter {name!r} is loaded", param="lora_name")
    if name in served.model.adapters:
        raise BadRequest(
            f"the adapter {name!r} comes from the configuration; remove it there", code="configured", param="lora_name"
        )
    register(svc.redis, settings, served, name, None)
    return jsonify(id=name, object="model", parent=served.alias, status="unloaded")
