"""Webhook deliveries in Redis and the dispatcher that sends them (at least once, retried on a schedule).

A delivery is a hash ``{prefix}:webhook:{msg id}`` (kind, subject id, event, time, url, attempt and a
snapshot of the job or batch record) plus a member of the zset ``{prefix}:webhooks:due`` scored by when
to send it next. Job deliveries are added by the job transitions themselves (`notify` in common.lua),
batch deliveries when the last micro-batch is recorded; the dispatcher claims due entries with a lease
(a sender that dies leaves them to be claimed again), sends, and reschedules or removes them. Each
attempt is appended to ``{prefix}:{kind}:{id}:webhooks``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import redis

from qwen_deploy.config import Settings
from qwen_deploy.connections import settings_client
from qwen_deploy.job_records import as_text, public_job
from qwen_deploy.keys import JobKeys, WebhookKeys
from qwen_deploy.lua import script
from qwen_deploy.states import JOB_TERMINAL
from qwen_deploy.webhooks import Attempt, destination, next_delay, post, sign

log = logging.getLogger(__name__)

EVENT_TYPES = {
    ("job", "start"): "job.started",
    ("job", "output"): "job.output",
    ("job", "completed"): "job.completed",
    ("batch", "completed"): "batch.completed",
}
MAX_ATTEMPTS_KEPT = 200
SCAN = 256  # due deliveries looked at per pass when spreading them over receivers
DEFER = 1.0  # seconds a delivery waits when its receiver has `per_destination` deliveries in flight


def _public(kind: str, record: dict[str, str]) -> dict[str, Any]:
    from qwen_deploy.batches import public_batch

    return public_job(record) if kind == "job" else public_batch(record)


class WebhookStore(WebhookKeys):
    """Deliveries, their attempts, and one dispatch pass; every Redis call is one round trip."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r, self.settings = client, settings
        super().__init__(settings.key_prefix)
        self.ttl, self.jobs = settings.limits.result_ttl, JobKeys(settings.key_prefix)
        self.hooks = settings.webhooks
        self.lease = self.hooks.timeout + 30.0
        self._claim = client.register_script(script("webhook_claim"))
        self._claim_members = client.register_script(script("webhook_claim_members"))
        self._enqueue = client.register_script(script("webhook_enqueue"))

    # -- adding deliveries ----------------------------------------------------------------------
    def enqueue(self, kind: str, subject: str, event: str, msg_id: str) -> bool:
        """Add a delivery for a batch (`completed`) or a running job (`output`) if its state calls for one."""
        return bool(
            self._enqueue(
                keys=[self.subject_key(kind, subject), self.due_key(), self.delivery_key(msg_id)],
                args=[repr(time.time()), kind, event, msg_id],
            )
        )

    def watch_output(self, job_id: str) -> None:
        """Look at a job every `output_interval` seconds while it runs (for `output` events)."""
        self.r.zadd(self.watch_key(), {job_id: time.time() + self.hooks.output_interval})

    def pump_outputs(self, limit: int = 100) -> int:
        """Add an `output` delivery for each watched running job whose output changed; forget ended jobs."""
        added = 0
        for job_id in self._claim(keys=[self.watch_key()], args=[repr(time.time()), self.hooks.output_interval, limit]):
            job_id = as_text(job_id)
            status = as_text(self.r.hget(self.jobs.key(job_id), "status"))
            if not status or status in JOB_TERMINAL:
                self.r.zrem(self.watch_key(), job_id)
            elif status == "running":
                added += self.enqueue("job", job_id, "output", f"msg_{job_id}_output_{time.time_ns() // 1_000_000}")
        return added

    # -- sending --------------------------------------------------------------------------------
    def claim(self, limit: int = 64) -> list[str]:
        return [as_text(m) for m in self._claim(keys=[self.due_key()], args=[repr(time.time()), self.lease, limit])]

    def claim_spread(self, free: int, busy: Counter[str], cap: int) -> list[tuple[str, str]]:
        """Claim up to `free` due deliveries, at most `cap` in flight per receiver counting `busy` (in flight
        per ``host:port``); a due one whose receiver is full waits `DEFER` seconds. (msg id, receiver) pairs."""
        now = time.time()
        due = [as_text(m) for m in self.r.zrangebyscore(self.due_key(), "-inf", now, start=0, num=SCAN)]
        if not due:
            return []
        pipe = self.r.pipeline(transaction=False)
        for msg_id in due:
            pipe.hget(self.delivery_key(msg_id), "url")
        load = Counter(busy)
        take: dict[str, str] = {}  # msg id -> receiver
        later: list[str] = []
        for msg_id, url in zip(due, pipe.execute(), strict=True):
            dest = destination(as_text(url)) if url else ""
            if dest and load[dest] >= cap:
                later.append(msg_id)
            elif len(take) < free:
                take[msg_id] = dest
                load[dest] += 1
        claimed = self._claim_members(
            keys=[self.due_key()], args=[repr(now), self.lease, DEFER, len(take), *take, *later]
        )
        return [(msg_id, take[msg_id]) for msg_id in map(as_text, claimed)]

    def payload(self, delivery: dict[str, str]) -> str:
        """The body: the same bytes on every attempt (built from the snapshot taken at the event)."""
        flat = json.loads(delivery["record"])
        record = {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}
        kind = delivery["kind"]
        stamp = datetime.fromtimestamp(float(delivery["time"]), UTC).isoformat().replace("+00:00", "Z")
        return json.dumps(
            {"type": EVENT_TYPES[(kind, delivery["event"])], "timestamp": stamp, "data": _public(kind, record)}
        )

    def deliver(self, msg_id: str) -> Attempt | None:
        """One attempt of a claimed delivery; then reschedule it or close it."""
        raw = self.r.hgetall(self.delivery_key(msg_id))
        delivery = {as_text(k): as_text(v) for k, v in raw.items()}
        if not delivery.get("record") or delivery.get("state"):
            self.r.zrem(self.due_key(), msg_id)
            return None
        secret = self.hooks.secret.get_secret_value() if self.hooks.secret else None
        body = self.payload(delivery)
        stamp = int(time.time())
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(stamp)}
        if secret:
            headers["webhook-signature"] = sign(secret, msg_id, stamp, body)
        hooks = self.hooks
        attempt = post(delivery["url"], body, headers, hooks.timeout, hooks.allowed_hosts, hooks.connect_timeout)
        made = int(delivery.get("attempt") or 0) + 1
        delay = next_delay(attempt, made, self.hooks.retry_schedule)
        entry = {
            "time": time.time(),
            "event": EVENT_TYPES[(delivery["kind"], delivery["event"])],
            "webhook_id": msg_id,
            "attempt": made,
            "status_code": attempt.status_code,
            "duration_ms": attempt.duration_ms,
            "error": attempt.error,
        }
        log_key = self.attempts_key(delivery["kind"], delivery["subject"])
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(log_key, json.dumps(entry))
        pipe.ltrim(log_key, -MAX_ATTEMPTS_KEPT, -1)
        pipe.expire(log_key, self.ttl)
        pipe.hset(self.delivery_key(msg_id), "attempt", made)
        if delay is None:
            ok = attempt.status_code is not None and 200 <= attempt.status_code < 300
            pipe.hset(self.delivery_key(msg_id), "state", "delivered" if ok else "failed")
            pipe.expire(self.delivery_key(msg_id), self.ttl)
            pipe.zrem(self.due_key(), msg_id)
        else:
            pipe.zadd(self.due_key(), {msg_id: time.time() + delay})
        pipe.execute()
        log.info("webhook %s attempt %d: %s %s", msg_id, made, attempt.status_code, attempt.error or "")
        return attempt

    def attempts(self, kind: str, subject: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(self.attempts_key(kind, subject), 0, -1)]


def dispatch_due(store: WebhookStore, limit: int = 64) -> int:
    """One pass in the calling thread: output events, then every due delivery (up to `limit`)."""
    store.pump_outputs()
    claimed = store.claim(limit)
    for msg_id in claimed:
        store.deliver(msg_id)
    return len(claimed)


class Dispatcher:
    """A thread that sends due deliveries (several at once, at most `webhooks.per_destination` to one
    receiver, so a slow receiver holds up only its own deliveries) and adds `output` events."""

    def __init__(self, settings: Settings, senders: int = 8, idle: float = 0.05) -> None:
        client = settings_client(settings, socket_timeout=10.0)
        self.store, self.idle = WebhookStore(client, settings), idle
        self.pool = ThreadPoolExecutor(senders, thread_name_prefix="webhook")
        self.senders = senders
        self._inflight: dict[Future[None], str] = {}  # the receiver of each
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run_once(self) -> int:
        """Add output events, claim what is due for the free senders (within each receiver's limit) and start
        sending; the number claimed."""
        self.store.pump_outputs()
        self._inflight = {f: dest for f, dest in self._inflight.items() if not f.done()}
        free = self.senders - len(self._inflight)
        if free <= 0:
            return 0
        busy = Counter(self._inflight.values())
        claimed = self.store.claim_spread(free, busy, self.store.hooks.per_destination)
        for msg_id, dest in claimed:
            self._inflight[self.pool.submit(self._send, msg_id)] = dest
        return len(claimed)

    def _send(self, msg_id: str) -> None:
        try:
            self.store.deliver(msg_id)
        except Exception:  # the lease runs out and the entry is claimed again
            log.exception("webhook %s: delivery failed", msg_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.run_once()
            except redis.RedisError as exc:  # Redis restarting: try again shortly
                log.warning("webhook dispatcher: %s", exc)
                sent = 0
                self._stop.wait(1.0)
            except Exception:  # never let one bad entry stop the thread
                log.exception("webhook dispatcher pass failed")
                sent = 0
                self._stop.wait(1.0)
            if not sent:
                self._stop.wait(self.idle)
