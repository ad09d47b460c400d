"""The generation task: a thin wrapper around worker.executor."""

from __future__ import annotations

from celery import shared_task

from qwen_deploy.config import get_settings
from qwen_deploy.connections import job_store
from qwen_deploy.queues import GENERATE_TASK


@shared_task(name=GENERATE_TASK, Request="tasks.requests:JobRequest")
def generate(job_id: str) -> str:
    """Run one generation job by id; the request lives in the job record."""
    from worker.executor import execute
    from worker.runtime import get_handler, process_name

    settings = get_settings()
    lim = settings.limits
    return execute(job_store(settings), get_handler(), job_id, process_name(), lim.max_deliveries,
                   lim.generation_budget, lim.hard_time_limit + lim.reap_grace)
