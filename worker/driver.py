"""Co-scheduling the engine with Celery: whichever generation task the child runs drives the one engine.

A task that starts claims its own job (or micro-batch), then keeps claiming waiting jobs straight from
the job records (CLAIM.lua, interactive FIFO) between decode steps, up to the engine's limits. Each
job's Celery message stays queued; when it is delivered it finds its job terminal (skip), in this
engine (drive until it ends) or held by another live worker (skip). A task drives until its own work
is done and then while the engine has work, but never past its time slice (the soft limit minus a
margin): then it pushes a `drive` task onto this worker's own queue and returns, so every sequence
always has a driving task and every task stays inside Celery's time limits. A task that returns without
driving (its job was over, yet it claimed or took over others, e.g. a killed child's) hands on the same way
(`hand_on`, after every task of the child).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from redis.exceptions import RedisError

from qwen_deploy.adapters import registered
from qwen_deploy.connections import redis_client
from qwen_deploy.job_records import as_text
from qwen_deploy.jobs import Claim, ClaimOutcome, JobStore
from qwen_deploy.keys import adapters_version_key
from qwen_deploy.logs import event
from qwen_deploy.reaper import drop_unacked, unacked_tags
from qwen_deploy.requests import GenerationRequest, InvalidRequest
from qwen_deploy.served import Served
from qwen_deploy.states import GENERATION_FAILED
from worker.engine import Engine, Seq, stable_text
from worker.handler import ModelHandler
from worker.reload import Reloader
from worker.running import RunningJob, holder_alive, last_deltas, other_deltas, terminal_state

log = logging.getLogger(__name__)
ADAPTER_SYNC_EVERY = 0.25  # seconds between looks at the adapters' version (runtime loads and unloads)


class Driver:
    """The engine of one worker child and the bookkeeping that ties its sequences to job records."""

    def __init__(
        self,
        handler: ModelHandler,
        store: JobStore,
        worker: str,
        handoff: Callable[[], None] | None = None,
        model: Served | None = None,
        on_swap: Callable[[ModelHandler, dict[str, Any]], None] | None = None,
    ) -> None:
        self.handler, self.store, self.worker = handler, store, worker
        # The model this engine serves: it claims only that model's jobs and yields to its bulk queue.
        self.model = model.alias if model else None
        self.served = model
        self.bulk_queue = model.bulk if model else "bulk"
        self.settings = handler.settings
        self.client = redis_client(self.settings)  # adapters' registry, this host's engines, unacked copies
        self.engine: Engine = handler.engine()
        self.jobs: dict[str, RunningJob] = {}
        self.to_finish: list[RunningJob] = []
        self.units: dict[Any, Any] = {}  # other owners of sequences (micro-batches), by tag
        self.handoff = handoff
        eng, lim = self.settings.engine, self.settings.limits
        self.lease, self.max_deliveries = eng.lease_seconds, lim.max_deliveries
        self.claim_every = eng.claim_interval_ms / 1000
        self.flush_every = self.settings.generation.progress_interval_ms / 1000
        self.next_claim = self.next_flush = self.next_adapter_sync = 0.0
        self.adapters_version: Any = None
        self.adapters_synced = False  # the first look syncs whatever the version
        self.soft_hit = False
        self.on_swap = on_swap  # told of new weights (the process's handler and revision)
        self.reloader = Reloader(self)

    # -- claims ----------------------------------------------------------------------------------
    def claim_job(self, job_id: str) -> ClaimOutcome:
        """Claim one job for this engine: run | mine | busy | skip | missing | exhausted | other."""
        if job_id in self.jobs:
            return ClaimOutcome.MINE
        if self.reloader.turn is not None:  # reloading: the job waits for the new weights (or another worker)
            return ClaimOutcome.DEFERRED
        claims = self._claim(1, job_id=job_id)
        outcome = claims[0] if claims else None
        if outcome and outcome.outcome is ClaimOutcome.BUSY and not holder_alive(outcome.detail):
            dead = outcome.detail  # its child was killed: take over its job and everything else it held
            claims = self._claim(1, job_id=job_id, takeover=dead)
            self._admit(claims, taken_over=True)
            self._admit(self._claim(self.engine.room(), takeover=dead), taken_over=True)
            outcome = claims[0] if claims else None
        else:
            self._admit(claims)
        if outcome is None:
            return ClaimOutcome.MISSING
        if outcome.outcome not in (ClaimOutcome.RUN, ClaimOutcome.MINE):
            event(log, "job.skipped", logging.INFO, id=job_id, reason=outcome.outcome, detail=outcome.detail or None)
        return outcome.outcome

    def _claim(self, room: int, job_id: str = "", takeover: str = "") -> list[Claim]:
        return self.store.claim(
            self.worker, self.lease, self.max_deliveries, room, job_id=job_id, takeover=takeover, model=self.model
        )

    def claim_waiting(self) -> None:
        room = self.engine.room()
        if room > 0:
            self._admit(self._claim(room))

    # -- LoRA adapters loaded or unloaded at runtime -------------------------------------------------
    def sync_adapters(self, force: bool = False) -> None:
        """Between steps: when the adapters' version changed (a runtime load or unload), make this engine's
        registered adapters those of its model (config + Redis), loading new ones while there is room."""
        adapters = self.handler.adapters
        now = time.monotonic()
        if adapters is None or self.served is None or (not force and now < self.next_adapter_sync):
            return
        self.next_adapter_sync = now + ADAPTER_SYNC_EVERY
        client = self.client
        version = client.get(adapters_version_key(self.settings.key_prefix))
        if version == self.adapters_version and self.adapters_synced and not force:
            return
        self.adapters_version, self.adapters_synced = version, True
        busy = {s.adapter for s in self.engine.sequences() if s.adapter}
        with adapters.lock:
            adapters.sync(registered(client, self.settings, self.served), busy)

    def knows_adapters(self, requests: list[GenerationRequest | None]) -> None:
        """Before sequences of these requests are built: an adapter this engine does not know yet may have
        been loaded a moment ago, so look again (once)."""
        adapters = self.handler.adapters
        names = {r.adapter for r in requests if r is not None and r.adapter}
        if adapters is not None and any(not adapters.known(n) for n in names):
            self.sync_adapters(force=True)

    def _admit(self, claims: list[Claim], taken_over: bool = False) -> None:
        budget = self.settings.limits.generation_budget
        strict = self.settings.generation.strict_requests
        parsed = {c.job_id: parse_request(c.request, strict) for c in claims if c.outcome is ClaimOutcome.RUN}
        if parsed:
            self.knows_adapters([r for r in parsed.values() if isinstance(r, GenerationRequest)])
        for c in claims:
            if c.outcome is not ClaimOutcome.RUN:
                continue
            if taken_over:  # the dead process's worker may have held the job's message unacked
                drop_unacked(self.client, self.store.prefix, unacked_tags(self.client, self.store.prefix, c.job_id))
            deadline = c.deadline
            try:
                req = parsed[c.job_id]
                if isinstance(req, Exception):
                    raise req
                resume = c.out_ids if c.attempt > 1 else None
                seqs, prompt_tokens, truncated = self.handler.sequences(
                    req,
                    c.job_id,
                    budget=budget if deadline is None else min(budget, deadline - time.time()),
                    tag=c.job_id,
                    resume=resume,
                )
            except Exception as exc:  # a request this model cannot run fails alone
                log.warning("job %s cannot run: %s", c.job_id, exc)
                code = getattr(exc, "code", None) or "invalid_request"
                self.store.finish(
                    c.job_id, "failed", {"error": {"code": code, "message": str(exc)}}, holder=self.worker
                )
                continue
            job = RunningJob(c.job_id, req, seqs, prompt_tokens, truncated, c.attempt, deadline=deadline)
            if resume:
                job.sent, job.sent_tokens = c.text, len(resume)
            self.jobs[c.job_id] = job
            for seq in seqs:
                self.engine.add(seq)
            event(
                log,
                "job.started",
                id=c.job_id,
                queue="interactive",
                worker=self.worker,
                attempt=c.attempt,
                resumed_tokens=len(resume or []),
            )

    # -- the loop --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _soft_limit_deferred(self) -> Iterator[None]:
        """Celery's soft time limit (SIGUSR1) ends the slice at the next safe point instead of raising
        in the middle of a step, so the engine's state is never left half-updated."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
            yield
            return
        self.soft_hit = False

        def on_soft_limit(signum: int, frame: Any) -> None:
            self.soft_hit = True

        previous = signal.signal(signal.SIGUSR1, on_soft_limit)
        try:
            yield
        finally:
            signal.signal(signal.SIGUSR1, previous)

    def drive(self, done: Callable[[], bool], slice_end: float) -> None:
        """Step the engine until `done()` and the engine is idle, or the slice ends (then hand off)."""
        self.soft_hit = False
        if self.reloader.ready:  # a reload's turn, drained: the weights load at the start of a slice
            self.reloader.swap()
        with self._soft_limit_deferred(), self._adapters_held():
            self._drive(done, slice_end)

    @contextlib.contextmanager
    def _adapters_held(self) -> Iterator[None]:
        """While this task steps the engine, the heartbeat leaves the adapters alone (it syncs idle workers)."""
        if self.handler.adapters is None:
            yield
            return
        with self.handler.adapters.lock:
            yield

    def adopt_orphans(self) -> None:
        """Take over the jobs of engines on this host whose process died (a killed child's successor)."""
        key = self.store.engines_key(socket.gethostname(), self.model)
        client = self.client
        client.sadd(key, self.worker)
        for holder in map(as_text, client.smembers(key)):
            if holder != self.worker and not holder_alive(holder):
                self._admit(self._claim(self.engine.room(), takeover=holder), taken_over=True)
                client.srem(key, holder)

    def _drive(self, done: Callable[[], bool], slice_end: float) -> None:
        while time.monotonic() < slice_end and not self.soft_hit:
            try:
                if not self._tick(done):
                    break
            except RedisError as exc:  # Redis away: keep the engine's state, retry its writes when it is back
                log.warning("redis unavailable while driving the engine: %s", exc)
                time.sleep(0.5)
            except Exception:
                log.exception("engine step failed; failing its sequences")
                self.finished(self.engine.fail_all("error"))
        try:
            self.flush()
        except RedisError as exc:  # leases run out and the jobs are resumed elsewhere
            log.warning("could not publish the engine's progress: %s", exc)
        self.hand_on()

    def hand_on(self) -> None:
        """An engine that still holds work when its task returns gets a driving task: a `drive` task on
        this worker's own queue (none is pushed while one waits there). Every task's end comes here, so jobs
        claimed outside a driving task (a dead child's, taken over by a task whose own job was over) run on."""
        if not (len(self.engine) or self.to_finish or self.reloader.turn) or self.handoff is None:
            return
        try:
            self.handoff()
        except RedisError as exc:  # leases run out and the jobs are resumed elsewhere
            log.warning("could not hand the engine on: %s", exc)

    def _tick(self, done: Callable[[], bool]) -> bool:
        """One pass of the loop; False when this task may return."""
        now = time.monotonic()
        if self.to_finish:
            self._finish_pending()
        if now >= self.next_claim:
            self.next_claim = now + self.claim_every
            self.sync_adapters()
            if not self.reloader.check():
                self.claim_waiting()
        if self.reloader.ready:
            return False  # the next driving task loads the new weights first
        if not len(self.engine):
            if done() and not self.to_finish and not self._last_look():
                return False
            time.sleep(0.005)
            return True
        if done() and self.yield_to_bulk():
            return False
        self.finished(self.engine.step())
        if time.monotonic() >= self.next_flush:
            self.flush()
        return True

    def _last_look(self) -> bool:
        """Before a task leaves an empty engine: claim what waits (a job whose message a reloading worker answered
        `deferred` has no other wake-up); whether it claimed anything."""
        if self.reloader.check():
            return False
        self.claim_waiting()
        return bool(len(self.engine))

    def yield_to_bulk(self) -> bool:
        """Own work is done: return to Celery when a micro-batch waits and no bulk rows are running."""
        return not self.units and bool(self.store.queue_length(self.bulk_queue))

    def flush(self) -> None:
        """Publish partial text, renew leases, read cancel flags: one round trip for every running job."""
        self.next_flush = time.monotonic() + self.flush_every
        for unit in list(self.units.values()):
            unit.poll()
        if not self.jobs:
            return
        pipe = self.store.progress_pipeline()
        order = []
        lease_until = time.time() + self.lease
        for job in self.jobs.values():
            first = job.seqs[0]
            tokens = sum(len(s.out) for s in job.seqs)
            text = stable_text(first, self.handler.decode) if not first.done else job.sent
            changed = tokens != job.sent_tokens
            delta = text[len(job.sent) :] if changed and text.startswith(job.sent) else ""
            others = other_deltas(job, self.handler.decode) if changed and len(job.seqs) > 1 else []
            self.store.queue_progress(
                pipe, job.job_id, self.worker, lease_until, tokens, text if changed else None, delta, first.out, others
            )
            if changed:
                job.sent, job.sent_tokens = (text if text.startswith(job.sent) else job.sent), tokens
            order.append(job)
        for job, reply in zip(order, pipe.execute(raise_on_error=False)):
            if reply == 1:
                for seq in job.seqs:
                    seq.canceled = True
            elif reply == -1:  # canceled while queued, expired, or claimed by another worker: stop it here
                for seq in job.seqs:
                    seq.canceled = True
                job.lost = True

    def finished(self, seqs: list[Seq]) -> None:
        for seq in seqs:
            owner, _ = seq.tag
            if owner in self.jobs:
                if all(s.done for s in self.jobs[owner].seqs):
                    self.to_finish.append(self.jobs.pop(owner))
            elif owner in self.units:
                self.units[owner].seq_done(seq)
        if self.to_finish:
            self._finish_pending()

    def _finish_pending(self) -> None:
        """Write the terminal state of finished jobs (kept for a retry while Redis is away)."""
        while self.to_finish:
            self._finish_job(self.to_finish[0])
            self.to_finish.pop(0)

    def _finish_job(self, job: RunningJob) -> None:
        if job.lost:
            event(log, "job.dropped", logging.WARNING, id=job.job_id, reason="no longer held by this worker")
            return
        try:
            result = self.handler.result(job.seqs, job.prompt_tokens, job.truncated, job.req)
            status, fields = terminal_state(job, result)
        except Exception:  # its result cannot be built: the job fails alone (never retried at every step)
            log.exception("job %s: building its result failed", job.job_id)
            self.store.finish(job.job_id, "failed", {"error": GENERATION_FAILED}, holder=self.worker)
            event(log, "job.finished", logging.ERROR, id=job.job_id, queue="interactive", status="failed")
            return
        delta = result.text[len(job.sent) :] if result.text.startswith(job.sent) else ""
        others = last_deltas(job, [c["text"] for c in result.choices]) if len(job.seqs) > 1 else []
        self.store.finish(
            job.job_id, status, fields, delta, result.completion_tokens, holder=self.worker, others=others
        )
        event(
            log,
            "job.finished",
            id=job.job_id,
            queue="interactive",
            status=status,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            prompt_truncated=result.prompt_truncated,
            finish_reason=result.finish_reason,
            attempt=job.attempt,
            run_ms=round((time.perf_counter() - job.started) * 1000, 1),
        )


def parse_request(raw: str, strict: bool = False) -> GenerationRequest | InvalidRequest:
    """A claimed job's stored request, or why it cannot be read (the job then fails alone)."""
    try:
        found = json.loads(raw)
    except (TypeError, ValueError) as exc:
        return InvalidRequest(f"the stored request is not JSON: {exc}")
    if not isinstance(found, dict):
        return InvalidRequest("the stored request is not a JSON object")
    try:
        return GenerationRequest.from_dict(found, strict=strict)
    except (InvalidRequest, TypeError) as exc:
        return exc if isinstance(exc, InvalidRequest) else InvalidRequest(str(exc))
