"""A generation job while its samples run in this child's engine, the record it leaves when it ends, and the
liveness check of a holder."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from qwen_deploy.requests import GenerationRequest
from qwen_deploy.states import DEADLINE_EXCEEDED, JOB_FINISH_ERRORS
from worker.engine import Seq, stable_text
from worker.handler import GenerationResult

STATUS_BY_REASON = {"time_limit": "timed_out", "canceled": "canceled", "error": "failed"}


@dataclass
class RunningJob:
    """A generation job whose samples are in this engine."""

    job_id: str
    req: GenerationRequest
    seqs: list[Seq]
    prompt_tokens: int
    truncated: bool
    attempt: int
    sent: str = ""  # text already published to the record and stream
    sent_tokens: int = -1
    sent_others: list[str] = field(default_factory=list)  # the same for samples after the first
    lost: bool = False  # no longer this worker's (canceled while queued, expired, taken over)
    deadline: float | None = None  # the job's Cancel-After deadline (epoch seconds)
    started: float = field(default_factory=time.perf_counter)


def other_deltas(job: RunningJob, decode: Any) -> list[tuple[int, str]]:
    """New stable text of the samples after the first, as (index, delta); remembered as sent."""
    if not job.sent_others:
        job.sent_others = [""] * (len(job.seqs) - 1)
    deltas = []
    for i, seq in enumerate(job.seqs[1:], 1):
        sent = job.sent_others[i - 1]
        text = sent if seq.done else stable_text(seq, decode)
        if len(text) > len(sent) and text.startswith(sent):
            deltas.append((i, text[len(sent) :]))
            job.sent_others[i - 1] = text
    return deltas


def last_deltas(job: RunningJob, texts: list[str]) -> list[tuple[int, str]]:
    """The final text of the samples after the first that was not streamed yet, as (index, delta)."""
    sent = job.sent_others or [""] * (len(job.seqs) - 1)
    return [
        (i, text[len(done) :])
        for i, (text, done) in enumerate(zip(texts[1:], sent), 1)
        if len(text) > len(done) and text.startswith(done)
    ]


def terminal_state(job: RunningJob, result: GenerationResult) -> tuple[str, dict[str, Any]]:
    """The terminal status and record fields of a finished job; stopped at its deadline, it is `canceled`
    with `deadline_exceeded`."""
    status = STATUS_BY_REASON.get(result.finish_reason, "succeeded")
    fields: dict[str, Any] = {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "tokens": str(result.completion_tokens),
        "usage": result.usage(),
    }
    if result.finish_reason == "error":
        fields["finish_reason"] = None
    if result.choices:
        fields["choices"] = result.choices
    if result.stop_sequence is not None:
        fields["stop_sequence"] = result.stop_sequence
    if result.finish_reason in JOB_FINISH_ERRORS:
        fields["error"] = JOB_FINISH_ERRORS[result.finish_reason]
    if status in ("timed_out", "canceled") and job.deadline is not None and time.time() >= job.deadline - 0.25:
        status, fields["finish_reason"], fields["error"] = "canceled", "canceled", DEADLINE_EXCEEDED
    return status, fields


def holder_alive(holder: str) -> bool:
    """Whether a worker name `host:pid` may still be running (unknown hosts are assumed alive)."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
