"""Model routes: hub downloads and checkpoint exports as jobs on the convert queue, and models registered at
runtime (`POST /v1/register_model`, `POST /v1/unregister_model`, admin keys; see qwen_deploy/runtime_models.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from qwen_deploy.adapters import adapter_name_taken
from qwen_deploy.errors import Conflict, ModelNotFound, Unprocessable
from qwen_deploy.paths import confine
from qwen_deploy.queues import CONVERT, convert_task
from qwen_deploy.runtime_models import check_model_dir, register_model, runtime_records, unregister_model
from qwen_deploy.sections import ALIAS_PATTERN
from qwen_deploy.webhooks import check_request
from web.context import current_services
from web.openapi import Job, doc
from web.schemas import WebhookFields, read_json, validation_error
from web.services import enqueue

bp = Blueprint("models", __name__, url_prefix="/v1/models")
REVISION = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-]|/[A-Za-z0-9_-])*$"  # a branch, tag or commit


class DownloadCreate(WebhookFields):
    model_config = ConfigDict(extra="forbid")
    repo_id: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$", max_length=200)
    revision: StrictStr | None = Field(
        None, max_length=200, pattern=REVISION, description="a branch, tag or commit (e.g. main, v1.0, refs/pr/1)"
    )
    out: StrictStr | None = Field(None, description="directory relative to paths.models_root")
    allow_patterns: list[StrictStr] | None = Field(None, max_length=64)
    ignore_patterns: list[StrictStr] | None = Field(None, max_length=64)


class ExportCreate(WebhookFields):
    model_config = ConfigDict(extra="forbid")
    checkpoint: StrictStr = Field(description="relative to paths.checkpoints_root")
    base: StrictStr = Field(description="base HF model directory, relative to paths.models_root")
    out: StrictStr = Field(description="new directory, relative to paths.models_root")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_shard_size: StrictStr = Field("2GB", pattern=r"^[0-9]{1,9}(\.[0-9]{1,6})? ?[KMG]i?B$")
    keep_lora: StrictBool = Field(
        False,
        description="the checkpoint's LoRA written unmerged as a PEFT adapter directory (a PEFT adapter directory, "
        "or a verl/DeepSpeed/state-dict checkpoint whose state dict holds lora_A/lora_B tensors)",
    )
    lora_alpha: float | None = Field(
        None,
        gt=0,
        strict=True,
        description="the LoRA alpha used in training, when the checkpoint's adapter_config.json lacks it "
        "(verl writes 0)",
    )
    serve_as: StrictStr | None = Field(
        None,
        pattern=ALIAS_PATTERN,
        description="once checked, served under this name: as a LoRA adapter of its base model with keep_lora, "
        "else registered as a new model (its workers: `qwen-deploy worker --model NAME`)",
    )


class RegisterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: StrictStr = Field(pattern=ALIAS_PATTERN, description="the model's id in `model` fields")
    model_path: StrictStr = Field(description="a Hugging Face model directory, relative to paths.models_root")


class UnregisterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: StrictStr = Field(max_length=64)


class RegisteredModel(BaseModel):
    id: str
    object: str = "model"
    path: str = Field(description="relative to paths.models_root")
    status: str = Field(description="registered (start its workers: qwen-deploy worker --model ID) or unregistered")


def _submit(kind: str, req: dict[str, Any]) -> Response:
    limit = current_services().settings.limits.convert_time_limit
    hook = check_request(req.pop("webhook", None), req.pop("webhook_events_filter", None), current_services().settings)
    job, _ = enqueue(
        kind,
        convert_task(kind),
        CONVERT,
        req,
        (limit, limit - 30),
        request.headers.get("Idempotency-Key"),
        retry_after=60,
        extra=hook,
    )
    return Response(
        json.dumps(job), status=202, mimetype="application/json", headers={"Location": f"/v1/jobs/{job['id']}"}
    )


def _parse(schema: type[BaseModel]) -> dict[str, Any]:
    try:
        return schema.model_validate(read_json(request)).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise validation_error(exc) from None


@bp.post("/downloads")
@doc(ok=202, model=Job, json=DownloadCreate, tags=("models",))
def create_download() -> Response:
    """Download a hub snapshot as a job on the convert queue."""
    req = _parse(DownloadCreate)
    if "out" in req:
        confine(current_services().settings.paths.models_root, req["out"], "out")
    return _submit("download", req)


@bp.post("/exports")
@doc(ok=202, model=Job, json=ExportCreate, tags=("models",))
def create_export() -> Response:
    """Export a training checkpoint to a validated HF directory, as a job on the convert queue."""
    req = _parse(ExportCreate)
    paths = current_services().settings.paths
    confine(paths.checkpoints_root, req["checkpoint"], "checkpoint", must_exist=True)
    confine(paths.models_root, req["base"], "base", must_exist=True)
    confine(paths.models_root, req["out"], "out")
    if "serve_as" in req:
        _check_free(req["serve_as"], "serve_as")
    return _submit("export", req)


def _check_free(name: str, param: str) -> None:
    if adapter_name_taken(current_services().redis, current_services().settings, name):
        raise Conflict(f"the name {name!r} is already served", code="model_exists", param=param)


register_bp = Blueprint("model_registry", __name__, url_prefix="/v1")


@register_bp.post("/register_model")
@doc(model=RegisteredModel, json=RegisterModel, tags=("models",))
def register() -> Response:
    """Serve a Hugging Face model directory under a new id without a restart: requests naming it queue on its
    own queues, served once a worker runs for it (`qwen-deploy worker --model ID`)."""
    req = _parse(RegisterModel)
    name, svc = req["model_name"], current_services()
    _check_free(name, "model_name")
    path = confine(svc.settings.paths.models_root, req["model_path"], "model_path", must_exist=True)
    try:
        check_model_dir(path)
    except ValueError as exc:
        raise Unprocessable(str(exc), code="invalid_model", param="model_path") from None
    if not register_model(svc.redis, svc.settings, name, path, "register_model"):
        raise Conflict(f"the name {name!r} is already served", code="model_exists", param="model_name")
    return jsonify(id=name, object="model", path=req["model_path"], status="registered")


@register_bp.post("/unregister_model")
@doc(model=RegisteredModel, json=UnregisterModel, tags=("models",))
def unregister() -> Response:
    """Stop routing a model registered at runtime (its queued jobs stay for its workers; stop them yourself)."""
    name = _parse(UnregisterModel)["model_name"]
    svc = current_services()
    found = runtime_records(svc.redis, svc.settings).get(name)
    if found is None or not unregister_model(svc.redis, svc.settings, name):
        raise ModelNotFound(f"no model {name!r} is registered at runtime", param="model_name")
    root = svc.settings.paths.models_root.expanduser().resolve()
    path = Path(found["path"])
    shown = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    return jsonify(id=name, object="model", path=shown, status="unregistered")
