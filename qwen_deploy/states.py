"""The states of jobs and batches: one vocabulary for every room.

Jobs spell it `canceled` (as Replicate and RunPod do), batches `cancelled` (OpenAI's batch object,
which the `openai` SDK parses): one spelling per object, never mixed within one.
"""

from __future__ import annotations

from enum import StrEnum

# A job: queued -> running -> one terminal state; `canceling` while a running job is asked to stop.
QUEUED, RUNNING, CANCELING = "queued", "running", "canceling"
SUCCEEDED, FAILED, CANCELED, TIMED_OUT = "succeeded", "failed", "canceled", "timed_out"
JOB_STATES = (QUEUED, RUNNING, CANCELING, SUCCEEDED, FAILED, CANCELED, TIMED_OUT)
JOB_TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED, TIMED_OUT})

# A batch (OpenAI's names).
VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING = "validating", "in_progress", "finalizing", "cancelling"
COMPLETED, CANCELLED, EXPIRED = "completed", "cancelled", "expired"
BATCH_STATES = (VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED, FAILED, CANCELLING, CANCELLED, EXPIRED)
BATCH_TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})


class ErrorCode(StrEnum):
    """Why a job, a batch line or a worker ended without its result: the `error.code` of records and answers.

    The request errors the web answers (4xx) keep their codes in `web/`; these are the codes the core,
    the workers, the tasks and the Lua transitions write into records."""

    WORKER_LOST = "worker_lost"  # its worker died `max_deliveries` times
    LOST = "lost"  # its queue message was lost
    DEADLINE_EXCEEDED = "deadline_exceeded"  # Cancel-After / deadline_seconds reached
    PURGED = "purged"  # its queue was purged by an administrator
    CANCELED = "canceled"
    TIME_LIMIT = "time_limit"  # generation stopped at its time budget
    SOFT_TIME_LIMIT = "soft_time_limit"  # a conversion job ran past its time limit
    HARD_TIME_LIMIT = "hard_time_limit"  # the child was killed at the hard limit
    GENERATION_ERROR = "generation_error"  # the model failed while generating
    MODEL_LOAD_FAILED = "model_load_failed"
    INVALID_REQUEST = "invalid_request"  # a stored request this model cannot run
    INVALID_PROMPT = "invalid_prompt"  # a prompt token id outside the model's vocabulary
    TIMED_OUT = "timed_out"  # a batch line at its generation time budget
    BATCH_CANCELLED = "batch_cancelled"  # a batch line of a cancelled batch
    BATCH_EXPIRED = "batch_expired"  # a batch line its batch's completion_window ended


def error(code: ErrorCode | str, message: str) -> dict[str, str]:
    """An `error` object as records and answers carry it (`code` a str: an error's own code, e.g. a request's)."""
    return {"code": str(code), "message": message}


def worker_lost(max_deliveries: int) -> dict[str, str]:
    return error(
        ErrorCode.WORKER_LOST,
        f"the worker running this job died {max_deliveries} time(s); the job was not retried again",
    )


DEADLINE_EXCEEDED = error(
    ErrorCode.DEADLINE_EXCEEDED,
    "the job reached its deadline (Cancel-After or deadline_seconds) before it finished; output holds any partial text",
)
PURGED = error(ErrorCode.PURGED, "the queue was purged by an administrator")
GENERATION_FAILED = error(ErrorCode.GENERATION_ERROR, "the model failed while generating (see the worker log)")

# A generation that ended early, by its engine finish_reason: the error a job's record and a batch line carry.
JOB_FINISH_ERRORS = {
    "time_limit": error(ErrorCode.TIME_LIMIT, "generation stopped at its time budget"),
    "error": GENERATION_FAILED,
}
LINE_FINISH_ERRORS = {
    "time_limit": error(ErrorCode.TIMED_OUT, "the line reached its generation time budget"),
    "canceled": error(ErrorCode.BATCH_CANCELLED, "the batch was cancelled"),
    "error": GENERATION_FAILED,
}
LINE_EXPIRED = error(ErrorCode.BATCH_EXPIRED, "the batch's completion_window ended before this line finished")
