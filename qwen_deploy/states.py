"""The states of jobs and batches: one vocabulary for every room.

Jobs spell it `canceled` (as Replicate and RunPod do), batches `cancelled` (OpenAI's batch object,
which the `openai` SDK parses): one spelling per object, never mixed within one.
"""

from __future__ import annotations

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
