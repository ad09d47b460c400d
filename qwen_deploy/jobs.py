"""Job records in Redis: the single source of truth for a job's state, shared by web and worker.

A job is a hash ``{prefix}:job:{id}`` plus an event stream ``{prefix}:job:{id}:ev`` (token deltas,
status changes and a final ``done``). State changes that must not race (submit, start, cancel,
finish) are Lua scripts, so each is one atomic round trip. A terminal record is never rewritten.
This module holds those transitions (`JobStore`); ids, the field encoding, the reads and the job
object of the HTTP API are in `qwen_deploy/job_records.py`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from qwen_deploy.group_commit import GroupCommit
from qwen_deploy.job_records import JOB_ID_PREFIX, JobRecords, as_text, strings
from qwen_deploy.jsontext import dumpb
from qwen_deploy.lua import script
from qwen_deploy.states import JOB_TERMINAL, worker_lost

TERMINAL = JOB_TERMINAL
log = logging.getLogger(__name__)
INDEX_MAX = 100_000  # ids kept in an owner's job index (GET /v1/jobs); older ones are trimmed
PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}  # pending score: rank * 1e10 + submit time


def _flat(fields: dict[str, Any]) -> list[str]:
    return [part for item in strings(fields).items() for part in item]


class ClaimOutcome(StrEnum):
    """What a claim did with one job."""

    RUN = "run"  # claimed for this engine
    MINE = "mine"  # this worker already holds it
    BUSY = "busy"  # another live worker holds it (detail: the holder)
    SKIP = "skip"  # it has ended (detail: its status)
    MISSING = "missing"  # no such record (expired)
    EXHAUSTED = "exhausted"  # past its deliveries: failed worker_lost (detail: the delivery count)
    OTHER = "other"  # another model's job, never claimed (detail: its model)
    DEFERRED = "deferred"  # not claimed now: this worker is reloading its model (the job waits, queued)


@dataclass(frozen=True)
class Claim:
    """One entry of a CLAIM reply."""

    outcome: ClaimOutcome
    job_id: str
    detail: str = ""  # the holder (busy), the status (skip), the model (other), the deadline (run; "" for none)
    request: str = ""  # run: the stored request (JSON)
    attempt: int = 0  # run: this delivery's number
    out_ids: list[int] | None = None  # run: the ids already streamed (a re-run resumes from them)
    text: str = ""  # run: the text already streamed

    @classmethod
    def parse(cls, raw: str | bytes) -> Claim:
        entry = json.loads(raw)
        return cls(
            outcome=ClaimOutcome(entry["outcome"]),
            job_id=entry["id"],
            detail=entry["detail"],
            request=entry["request"],
            attempt=int(entry["attempt"]),
            out_ids=json.loads(entry["out_ids"]) if entry["out_ids"] else None,
            text=entry["text"],
        )

    @property
    def deadline(self) -> float | None:
        """A run's deadline (absolute time), if the job has one."""
        return float(self.detail) if self.outcome is ClaimOutcome.RUN and self.detail else None


@dataclass(frozen=True)
class SubmitResult:
    status: str  # ok | duplicate | reused | full | inflight | unavailable
    job_id: str
    depth: int = 0
    position: int | None = None  # an engine job's queue position, and the recent completion rate
    rate: float | None = None
    free: int = 0  # free engine rows of its model (the job starts at the next claim when position < free)


class JobStore(JobRecords):
    """Changes job records through the Lua transitions, on top of `JobRecords`' reads; every method is one
    Redis round trip."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "qd",
        ttl: int = 86400,
        reap_after: float = 600.0,
        default_model: str = "",
    ) -> None:
        super().__init__(client, prefix, default_model)
        self.ttl = ttl
        self.reap_after = reap_after
        self.wait_replicas, self.wait_ms = 0, 100  # WAIT after a submit (Sentinel: survive a failover)
        self.max_batch = 0  # engine rows per worker (`engine.max_batch`): free rows mean "starts now"
        self._submit = client.register_script(script("submit"))
        self._grouped = GroupCommit(client)  # concurrent submits share a round trip
        self._start = client.register_script(script("start"))
        self._cancel = client.register_script(script("cancel"))
        self._finish = client.register_script(script("finish"))
        self._claim = client.register_script(script("claim"))
        self._progress = client.register_script(script("progress"))

    def _keys(self, job_id: str) -> list[str]:
        return [self.key(job_id), self.events_key(job_id), self.stats_key(), self.active_key(), self.pending_key()]

    def submit(
        self,
        job_id: str,
        queue: str,
        message: str,
        fields: dict[str, Any],
        max_depth: int,
        idempotency_key: str | None = None,
        *,
        owner: str = "",
        route: str = "",
        body_hash: str = "",
        max_inflight: int = 0,
        engine: bool = False,
        model: str | None = None,
        unserved_cap: int | None = None,
        priority: str = "normal",
        deadline: float | None = None,
        fair_cost: float = 0.0,
    ) -> SubmitResult:
        """Write the record, index it under its owner and enqueue the message, unless the idempotency
        key was seen, the queue is full, the owner has `max_inflight` jobs in flight, or (with
        `unserved_cap`) no live worker serves `model` and its pending set holds that many jobs."""
        now = time.time()
        fields = {
            "id": job_id,
            "status": "queued",
            "queue": queue,
            "created_at": repr(now),
            "tokens": "0",
            "deliveries": "0",
            "priority": priority,
            "deadline": None if deadline is None else repr(deadline),
            **({"owner": owner} if owner else {}),
            **fields,
        }
        idem = self.idem_key(idempotency_key, owner, route) if idempotency_key else ""
        floor = f"{JOB_ID_PREFIX}{max(0, int((now - self.ttl) * 1000)):012x}"
        score = PRIORITY_RANK[priority] * 1e10 + float(fields["created_at"])
        engine_model = model or self.default_model
        keys = {
            "job": self.key(job_id),
            "queue": self.queue_key(queue),
            "idem": idem,
            "active": self.active_key(),
            "index": self.index_key(owner) if owner else "",
            "inflight": self.inflight_key(owner) if owner and max_inflight else "",
            "pending": self.pending_key(model) if engine else "",
            "served": self.model_workers_key(engine_model) if engine and unserved_cap is not None else "",
            "deadlines": self.deadlines_key() if deadline is not None else "",
            "fair": self.fair_key(model) if engine and fair_cost > 0 else "",
        }
        options = {
            "keys": {name: key for name, key in keys.items() if key},  # a key left out is not used
            "prefix": self.prefix,
            "id": job_id,
            "message": message,
            "ttl": self.ttl,
            "max_depth": max_depth,
            "reap_at": repr(now + self.reap_after),
            "fields": strings(fields),
            "body": body_hash,
            "max_inflight": max_inflight,
            "job_key": self.key(""),
            "index_floor": floor,
            "index_max": INDEX_MAX,
            "pending_score": score,
            "deadline": deadline,
            "now": now,
            "rank": PRIORITY_RANK[priority],
            "owner": owner,
            "fair_cost": fair_cost,
            "unserved_cap": -1 if unserved_cap is None else unserved_cap,
            "model": engine_model,
            "max_batch": self.max_batch,
        }
        status, value, *standing = self._grouped(self._submit, keys=[], args=[dumpb(options)])
        status, value = as_text(status), as_text(value)
        if status == "ok" and self.wait_replicas:
            self.replicated()
        if status in ("full", "inflight", "unavailable"):
            return SubmitResult(status, job_id, int(value))
        if standing:
            rate = float(as_text(standing[1]) or 0) or None
            return SubmitResult(status, value, position=int(standing[0]), rate=rate, free=int(standing[2]))
        return SubmitResult(status, value)

    def replicated(self) -> int:
        """WAIT until `wait_replicas` replicas have the writes so far (or `wait_ms` passed); how many did.
        Fewer is logged, not refused: the job is accepted on the master (see docs/RELIABILITY.md)."""
        acked = int(self.client.wait(self.wait_replicas, self.wait_ms))
        if acked < self.wait_replicas:
            log.warning("submit: %d of %d replicas acknowledged within %d ms", acked, self.wait_replicas, self.wait_ms)
        return acked

    def start(self, job_id: str, worker: str, max_deliveries: int, running_for: float = 3600.0) -> tuple[str, str]:
        """Mark running and count the delivery. Returns (run, request json) or (skip|missing|exhausted, why)."""
        error = worker_lost(max_deliveries)
        status, value = self._start(
            keys=self._keys(job_id),
            args=[
                repr(time.time()),
                worker,
                max_deliveries,
                json.dumps(error),
                self.ttl,
                repr(time.time() + running_for),
            ],
        )
        return as_text(status), as_text(value)

    def cancel(self, job_id: str, owner: str = "") -> str:
        """Cancel: 'canceled' (was queued), 'canceling' (running), 'terminal:<status>', or 'missing' (also
        for a job of another owner than `owner`, when given: it is left untouched)."""
        return as_text(self._cancel(keys=self._keys(job_id), args=[repr(time.time()), self.ttl, owner]))

    def finish(
        self,
        job_id: str,
        status: str,
        fields: dict[str, Any],
        delta: str = "",
        tokens: int = 0,
        holder: str = "",
        others: Sequence[tuple[int, str]] = (),
    ) -> bool:
        """Move a job to a terminal status, streaming the last text delta (and `others`, the last deltas of
        the samples after the first); False if it already was terminal (or, with `holder`, if that worker
        no longer holds the job)."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        done = self._finish(
            keys=self._keys(job_id),
            args=[repr(time.time()), status, self.ttl, delta, tokens, holder, json.dumps(list(others)), *_flat(fields)],
        )
        return bool(done)

    def claim(
        self,
        worker: str,
        lease: float,
        max_deliveries: int,
        room: int,
        job_id: str = "",
        takeover: str = "",
        model: str | None = None,
    ) -> list[Claim]:
        """Claim queued (or orphaned) generation jobs of `model` (default: the default model) for an engine:
        one job by id, or up to `room`. A job of another model is never claimed (outcome `other`)."""
        error = worker_lost(max_deliveries)
        now = time.time()
        options = {
            "prefix": self.prefix,
            "now": repr(now),
            "worker": worker,
            "lease_until": repr(now + lease),
            "max_deliveries": max_deliveries,
            "ttl": self.ttl,
            "exhausted": json.dumps(error),
            "room": room,
            "takeover": takeover or None,
            "job_id": job_id or None,
            "model": model or self.default_model,
            "default_model": self.default_model,
        }
        replies = self._claim(
            keys=[self.pending_key(model), self.active_key(), self.stats_key(), self.held_key(worker)],
            args=[json.dumps({k: v for k, v in options.items() if v is not None})],
        )
        return [Claim.parse(reply) for reply in replies]

    def progress_pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    def queue_progress(
        self,
        pipe: Any,
        job_id: str,
        worker: str,
        lease_until: float,
        tokens: int,
        text: str | None,
        delta: str,
        out_ids: list[int],
        others: Sequence[tuple[int, str]] = (),
    ) -> None:
        """Add one job's partial output (and lease renewal) to `pipe`; its reply is 1 cancel, 0 go on, -1 lost.
        `others`: (sample index, text delta) of samples after the first (token events with an `index`)."""
        self._progress(
            keys=[self.key(job_id), self.events_key(job_id), self.active_key()],
            args=[
                worker,
                repr(lease_until),
                "0" if text is None else "1",
                tokens,
                text or "",
                delta,
                json.dumps(out_ids),
                json.dumps(list(others)),
            ],
            client=pipe,
        )

    def report(self, job_id: str, progress: dict[str, Any]) -> bool:
        """Publish the progress of a non-generation job; return True when cancellation was requested."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key(job_id), "progress", json.dumps(progress))
        pipe.xadd(self.events_key(job_id), {"type": "progress", "progress": json.dumps(progress)})
        pipe.hget(self.key(job_id), "cancel")
        return as_text(pipe.execute()[-1]) == "1"
