"""Download and export as convert-queue jobs: claim the record, run the conversion function, report, finish."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_deploy.config import Settings
from qwen_deploy.jobs import JobStore
from qwen_deploy.logs import event
from qwen_deploy.paths import confine
from qwen_deploy.states import ErrorCode, error

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5


class Canceled(Exception):
    """The job's cancel flag was set."""


class Reporter:
    """Throttled progress into the job record; raises Canceled once cancellation is requested."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id, self.last = store, job_id, 0.0

    def __call__(self, progress: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < REPORT_INTERVAL_S:
            return
        self.last = now
        if self.store.report(self.job_id, progress):
            raise Canceled()


def run_download(req: dict[str, Any], settings: Settings, report: Reporter) -> dict[str, Any]:
    from conversion.download import download_model

    out = confine(settings.paths.models_root, req["out"], "out") if req.get("out") else None
    return download_model(
        req["repo_id"],
        revision=req.get("revision"),
        out=out,
        token=settings.token,
        allow_patterns=req.get("allow_patterns"),
        ignore_patterns=req.get("ignore_patterns"),
        progress=report,
    )


def run_export(req: dict[str, Any], settings: Settings, report: Reporter) -> dict[str, Any]:
    from conversion.export import export_checkpoint

    paths = settings.paths
    checkpoint = confine(paths.checkpoints_root, req["checkpoint"], "checkpoint", must_exist=True)
    base = confine(paths.models_root, req["base"], "base", must_exist=True)
    out = confine(paths.models_root, req["out"], "out")
    serve_as, lora_alpha = req.get("serve_as"), req.get("lora_alpha")
    report_ = lambda stage, fraction: report({"phase": stage, "fraction": round(fraction, 4)})  # noqa: E731
    if serve_as:
        _check_free(serve_as, settings)  # before any work: the web tier checked it too, a while ago
    if req.get("keep_lora"):
        return _export_adapter(checkpoint, base, out, serve_as, settings, lora_alpha, report_)
    result = export_checkpoint(
        checkpoint,
        base,
        out,
        dtype=req.get("dtype", "auto"),
        max_shard_size=req.get("max_shard_size", "2GB"),
        progress=report_,
        lora_alpha=lora_alpha,
    )
    if serve_as:
        result["served"] = _register_model(serve_as, out, settings)
    return result


def _check_free(name: str, settings: Settings) -> None:
    from qwen_deploy.adapters import adapter_name_taken
    from qwen_deploy.connections import redis_client
    from qwen_deploy.errors import Conflict

    if adapter_name_taken(redis_client(settings), settings, name):
        raise Conflict(f"the name {name!r} is already served", code="model_exists", param="serve_as")


def _register_model(name: str, out: Path, settings: Settings) -> dict[str, Any]:
    """The validated merged export registered as model `name` (qwen_deploy/runtime_models.py)."""
    from qwen_deploy.connections import redis_client
    from qwen_deploy.errors import Conflict
    from qwen_deploy.runtime_models import register_model

    if not register_model(redis_client(settings), settings, name, out, "export"):
        raise Conflict(
            f"exported to {out.name}, but the name {name!r} was taken meanwhile: register it under another "
            "name (POST /v1/register_model)",
            code="model_exists",
            param="serve_as",
        )
    return {"id": name, "object": "model", "status": "registered", "workers": f"qwen-deploy worker --model {name}"}


def _export_adapter(
    checkpoint: Path,
    base: Path,
    out: Path,
    serve_as: str | None,
    settings: Settings,
    lora_alpha: float | None,
    progress: Callable[[str, float], None],
) -> dict[str, Any]:
    """keep_lora: the adapter checked and written unmerged; serve_as: then registered for its base model."""
    from qwen_deploy.adapters import AdapterError, fitting_model, register
    from qwen_deploy.connections import redis_client
    from qwen_deploy.errors import Unprocessable
    from worker.lora_export import export_kept_lora

    try:
        report = export_kept_lora(checkpoint, base, out, lora_alpha, progress)
        if serve_as:
            served = fitting_model(out, settings)
            register(redis_client(settings), settings, served, serve_as, out)
            report["served"] = {"id": serve_as, "object": "model", "parent": served.alias, "status": "loaded"}
    except AdapterError as exc:
        raise Unprocessable(str(exc), code="invalid_adapter", param="checkpoint") from None
    return report


RUNNERS: dict[str, Callable[[dict[str, Any], Settings, Reporter], dict[str, Any]]] = {
    "download": run_download,
    "export": run_export,
}


def execute(store: JobStore, settings: Settings, job_id: str, kind: str, worker: str) -> str:
    """Run a download/export job by id and record its terminal state."""
    from celery.exceptions import SoftTimeLimitExceeded

    from conversion.errors import ConversionError
    from qwen_deploy.errors import AppError

    lim = settings.limits
    claim, value = store.start(job_id, worker, lim.max_deliveries, lim.convert_time_limit + lim.reap_grace)
    if claim != "run":
        return claim
    report = Reporter(store, job_id)
    try:
        result = RUNNERS[kind](json.loads(value), settings, report)
    except Canceled:
        store.finish(job_id, "canceled", {"error": error(ErrorCode.CANCELED, "the job was canceled")})
        return "canceled"
    except SoftTimeLimitExceeded:
        store.finish(
            job_id,
            "timed_out",
            {"error": error(ErrorCode.SOFT_TIME_LIMIT, f"the {kind} ran past its time limit")},
        )
        return "timed_out"
    except (ConversionError, AppError) as exc:
        code = exc.code or f"{kind}_failed"
        store.finish(job_id, "failed", {"error": {"code": code, "message": str(exc)}})
        return "failed"
    except Exception:  # an unexpected error fails the job, not the worker
        log.exception("%s job %s failed", kind, job_id)
        store.finish(
            job_id,
            "failed",
            {"error": {"code": f"{kind}_failed", "message": f"the {kind} failed unexpectedly (see the worker log)"}},
        )
        return "failed"
    store.finish(job_id, "succeeded", {"result": _jsonable(result), "progress": {"phase": "done", "fraction": 1.0}})
    event(log, "job.finished", id=job_id, queue="convert", type=kind, status="succeeded")
    return "succeeded"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: str(o) if isinstance(o, Path) else repr(o)))
