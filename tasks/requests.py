"""Task request class: hooks that run in the worker's main process, where a killed child cannot."""

from __future__ import annotations

import logging

from celery.worker.request import Request

from qwen_deploy.config import get_settings
from qwen_deploy.connections import job_store
from qwen_deploy.states import ErrorCode, error

log = logging.getLogger(__name__)


class JobRequest(Request):
    """Marks a job timed_out when the hard time limit kills its child (the job is not re-run)."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft:
            return
        try:
            job_store(get_settings()).finish(
                self.id,
                "timed_out",
                {
                    "finish_reason": "time_limit",
                    "error": error(
                        ErrorCode.HARD_TIME_LIMIT, f"the job was stopped at the hard time limit ({timeout:g} s)"
                    ),
                },
            )
        except Exception as exc:  # Redis away: the stuck-job check will settle it
            log.error("could not record hard time limit for %s: %s", self.id, exc)
