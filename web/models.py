"""Model routes: hub downloads and checkpoint exports as jobs on the convert queue."""

from __future__ import annotations

import json
from typing import Any, Literal

from flask import Blueprint, Response, request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from qwen_deploy.adapters import adapter_name_taken
from qwen_deploy.errors import BadRequest, Unprocessable
from qwen_deploy.paths import confine
from qwen_deploy.queues import CONVERT, convert_task
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
    keep_lora: StrictBool = Field(False, description="a PEFT adapter directory: checked and written unmerged")
    serve_as: StrictStr | None = Field(
        None, pattern=ALIAS_PATTERN, description="with keep_lora: once checked, served as this adapter name"
    )


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
        if not req.get("keep_lora"):
            raise Unprocessable("serve_as needs keep_lora: true", code="invalid_value", param="serve_as")
        if adapter_name_taken(current_services().redis, current_services().settings, req["serve_as"]):
            raise BadRequest(f"the name {req['serve_as']!r} is already served", code="adapter_exists", param="serve_as")
    return _submit("export", req)
