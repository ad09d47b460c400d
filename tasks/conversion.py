"""Download and export tasks on the convert queue, with their own (long) time limits."""

from __future__ import annotations

from celery import shared_task

from qwen_deploy.config import get_settings
from qwen_deploy.connections import job_store
from qwen_deploy.queues import DOWNLOAD_TASK, EXPORT_TASK

_limits = get_settings().limits
LIMITS = {"time_limit": _limits.convert_time_limit, "soft_time_limit": _limits.convert_time_limit - 30}


def _run(job_id: str, kind: str) -> str:
    from worker.convert_job import execute
    from worker.runtime import process_name

    settings = get_settings()
    return execute(job_store(settings), settings, job_id, kind, process_name())


@shared_task(name=DOWNLOAD_TASK, Request="tasks.requests:JobRequest", **LIMITS)
def download(job_id: str) -> str:
    """Snapshot-download a hub model (job record holds the request)."""
    return _run(job_id, "download")


@shared_task(name=EXPORT_TASK, Request="tasks.requests:JobRequest", **LIMITS)
def export(job_id: str) -> str:
    """Export a training checkpoint to a validated HF directory."""
    return _run(job_id, "export")
