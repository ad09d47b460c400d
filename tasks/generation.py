"""The generation tasks: thin wrappers that let the child's engine driver run (worker/driver.py)."""

from __future__ import annotations

import time

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from qwen_deploy.config import get_settings
from qwen_deploy.queues import DRIVE_TASK, GENERATE_TASK


def slice_end(soft_limit: float | None) -> float:
    """When a driving task must hand its engine on: before its soft time limit, with a margin."""
    soft = soft_limit or get_settings().limits.soft_time_limit
    return time.monotonic() + soft - min(5.0, soft * 0.2)


def _driver(task: object) -> object:
    from worker.runtime import get_driver

    return get_driver(get_settings(), task.request.hostname)  # type: ignore[attr-defined]


def _load_failure() -> dict[str, str] | None:
    from worker.runtime import load_error

    return load_error()


def _soft_limit(task: object) -> float | None:
    limits = getattr(task.request, "timelimit", None) or (None, None)  # type: ignore[attr-defined]
    return limits[1] if len(limits) > 1 else None


@shared_task(name=GENERATE_TASK, bind=True, Request="tasks.requests:JobRequest")
def generate(self: object, job_id: str) -> str:
    """Run one generation job by id in this child's engine (with whatever else it claims meanwhile)."""
    if _load_failure() is not None:  # the model did not load: the job fails now rather than wait for it
        from worker.runtime import answer_unloaded

        return answer_unloaded(get_settings(), job_id)
    driver = _driver(self)
    end = slice_end(_soft_limit(self))
    outcome = driver.claim_job(job_id)  # type: ignore[attr-defined]
    if outcome not in ("run", "mine"):
        return str(outcome)  # a ClaimOutcome
    try:
        driver.drive(lambda: job_id not in driver.jobs, end)  # type: ignore[attr-defined]
    except SoftTimeLimitExceeded:
        return "handed_off"
    return "done"


@shared_task(name=DRIVE_TASK, bind=True)
def drive(self: object) -> str:
    """A hand-off: keep this child's engine stepping until it is idle or this task's slice ends."""
    driver = _driver(self)
    if not len(driver.engine) and not driver.reloader.due():  # type: ignore[attr-defined]
        driver.adopt_orphans()  # type: ignore[attr-defined]
        if not len(driver.engine):  # type: ignore[attr-defined]
            return "idle"
    try:
        driver.drive(lambda: True, slice_end(_soft_limit(self)))  # type: ignore[attr-defined]
    except SoftTimeLimitExceeded:
        return "handed_off"
    return "done"
