"""Rolling a served model to new weights: `POST /v1/models/{id}/reload` (admin keys) and the reload's progress.

The checkpoint is checked against the served weights by its headers (a 422 says why it cannot replace them),
then a reload is recorded naming the model's ready workers: each in turn stops claiming, finishes or hands back
what it holds, loads the new weights and claims again (qwen_deploy/reloads.py, worker/reload.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from flask import Blueprint, Response, request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from qwen_deploy import registry, reloads
from qwen_deploy.checkpoints import CheckpointError, check_checkpoint
from qwen_deploy.errors import Conflict, NotFound, Unprocessable
from qwen_deploy.paths import confine
from qwen_deploy.served import Served
from web.auth import require_admin
from web.context import current_services
from web.openapi import ErrorBody, doc
from web.schemas import pick_target, read_json, validation_error

bp = Blueprint("reloads", __name__, url_prefix="/v1/models")


class ReloadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: StrictStr = Field(description="a Hugging Face model directory, relative to paths.models_root")


class ReloadWorker(BaseModel):
    worker: str = Field(description="the worker process (host:pid)")
    node: str | None = Field(None, description="its Celery node")
    state: Literal["waiting", "draining", "loading", "succeeded", "failed", "skipped", "gone"]
    since: float
    handed_back: int | None = Field(None, description="running jobs it handed back to resume elsewhere or later")
    error: str | None = None


class Reload(BaseModel):
    id: str
    object: Literal["model.reload"]
    model: str = Field(description="the model's id")
    path: str = Field(description="the checkpoint, as asked (relative to paths.models_root)")
    status: Literal["queued", "running", "succeeded", "failed"]
    created_at: float
    started_at: float | None
    completed_at: float | None
    workers: list[ReloadWorker] = Field(description="each worker of the model, in the order they take their turn")
    error: ErrorBody | None = None


def _model(name: str) -> Served:
    served, adapter = pick_target(name, current_services().settings)
    if adapter is not None:
        raise Unprocessable(
            f"{adapter!r} is a LoRA adapter: load it again under a new name instead", code="is_adapter", param="model"
        )
    return served


def _answer(record: dict[str, Any], status: int = 200) -> Response:
    return Response(
        json.dumps(reloads.public(record)),
        status=status,
        mimetype="application/json",
        headers={"Location": f"/v1/models/{record['model']}/reload"},
    )


@bp.post("/<path:name>/reload")
@doc(ok=202, model=Reload, json=ReloadCreate, tags=("models",), errors=(400, 401, 403, 404, 409, 415, 422, 503))
def reload_model(name: str) -> Response:
    """Roll a served model to new weights, one worker at a time, without losing a job."""
    require_admin()
    served = _model(name)
    try:
        path_arg = ReloadCreate.model_validate(read_json(request)).path
    except ValidationError as exc:
        raise validation_error(exc) from None
    svc = current_services()
    settings, prefix = svc.settings, svc.settings.key_prefix
    path = confine(settings.paths.models_root, path_arg, "path", must_exist=True)
    rolled = reloads.weights(svc.redis, prefix, served.alias)
    current = str(settings.paths.models_root.expanduser() / rolled["path"]) if rolled else served.model.name_or_path
    try:
        check_checkpoint(path, current)
    except CheckpointError as exc:
        raise Unprocessable(
            f"the checkpoint cannot replace the served weights: {exc}", code="invalid_checkpoint", param="path"
        ) from None
    found = registry.by_model(registry.workers(svc.redis, prefix), served.alias, served.default)
    ready = sorted((w for w in found if w.get("state") == "ready"), key=lambda w: str(w["name"]))
    if not ready:
        raise Conflict(f"no worker of {served.alias!r} has its model loaded", code="no_workers", param="model")
    record, created = reloads.create(svc.redis, prefix, served.alias, path_arg, ready)
    if not created:
        raise Conflict(
            f"the model is being reloaded ({record['id']}, {record['status']}); wait for it to end",
            code="reload_in_progress",
            param="model",
        )
    return _answer(record, 202)


@bp.get("/<path:name>/reload")
@doc(model=Reload, tags=("models",), errors=(401, 404, 503))
def get_reload(name: str) -> Response:
    """The model's latest reload: its status and each worker's progress."""
    served = _model(name)
    svc = current_services()
    found = reloads.last(svc.redis, svc.settings.key_prefix, served.alias)
    if found is None:
        raise NotFound(f"the model {served.alias!r} was never reloaded", code="reload_not_found")
    settled = reloads.settle(svc.redis, svc.settings.key_prefix, found["id"], svc.settings.limits.result_ttl)
    return _answer(settled or found)
