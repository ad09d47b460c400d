"""The job transitions on a real redis-server, without workers: SUBMIT, CLAIM, PROGRESS, CANCEL and
FINISH, with the races the engine relies on (leases, takeover, late writers)."""

from __future__ import annotations

import json
import re
import time

import redis

from qwen_deploy import keys, registry
from qwen_deploy.batches import BatchStore
from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from qwen_deploy.job_records import new_job_id
from qwen_deploy.jobs import ClaimOutcome, JobStore
from qwen_deploy.queues import GENERATE_TASK, Lane, task_message
from qwen_deploy.webhook_store import WebhookStore
from web.services.files import FileStore

INTERACTIVE_QUEUE = Lane.INTERACTIVE.queue
BULK_QUEUE = Lane.BULK.queue


def submit(store: JobStore, prompt: str = "hi") -> str:
    job_id = new_job_id()
    message = task_message(GENERATE_TASK, job_id, INTERACTIVE_QUEUE, [job_id])
    fields = {"type": "generation", "request": json.dumps({"prompt": prompt, "max_new_tokens": 4})}
    assert store.submit(job_id, INTERACTIVE_QUEUE, message, fields, 100, engine=True).status == "ok"
    return job_id


def test_claim_runs_a_queued_job_once_and_drops_its_wake_up_message(store: JobStore) -> None:
    first, second = submit(store, "a"), submit(store, "b")
    assert store.client.ttl(store.key(first)) == -1  # no TTL while not terminal
    claims = store.claim("host:1", lease=30, max_deliveries=2, room=8)
    assert [(c.outcome, c.job_id, json.loads(c.request)["prompt"], c.attempt) for c in claims] == [
        (ClaimOutcome.RUN, first, "a", 1),
        (ClaimOutcome.RUN, second, "b", 1),
    ]  # oldest first
    assert store.client.llen(store.queue_key(INTERACTIVE_QUEUE)) == 0 and store.client.zcard(store.pending_key()) == 0
    assert store.client.smembers(store.held_key("host:1")) == {first, second}
    assert [c.outcome for c in store.claim("host:2", 30, 2, 1, job_id=first)] == ["busy"]
    assert [c.outcome for c in store.claim("host:1", 30, 2, 1, job_id=first)] == ["mine"]
    assert store.claim("host:2", 30, 2, 8) == []  # nothing left to claim
    assert store.get(first)["status"] == "running" and store.get(first)["deliveries"] == "1"


def test_cancel_while_queued_is_final_and_never_claimed(store: JobStore) -> None:
    job = submit(store)
    assert store.cancel(job) == "canceled"
    assert store.claim("host:1", 30, 2, 8) == []
    assert [c.outcome for c in store.claim("host:1", 30, 2, 1, job_id=job)] == ["skip"]
    assert store.get(job)["deliveries"] == "0" and store.client.ttl(store.key(job)) > 0


def progress(store: JobStore, job: str, worker: str, text: str, ids: list[int]) -> int:
    pipe = store.progress_pipeline()
    store.queue_progress(pipe, job, worker, lease_until=9e12, tokens=len(ids), text=text, delta=text, out_ids=ids)
    return int(pipe.execute()[0])


def test_only_the_holder_writes_and_finishes(store: JobStore) -> None:
    job = submit(store)
    store.claim("host:1", 30, 2, 1, job_id=job)
    assert progress(store, job, "host:1", " pass", [5, 6]) == 0
    assert progress(store, job, "host:9", " nope", [1]) == -1
    assert store.get(job)["text"] == " pass"
    assert store.cancel(job) == "canceling"
    assert progress(store, job, "host:1", " pass", [5, 6]) == 1  # the cancel flag reaches the holder
    assert not store.finish(job, "succeeded", {"text": "x"}, holder="host:9")
    assert store.finish(job, "canceled", {"text": " pass"}, holder="host:1")
    assert not store.finish(job, "failed", {"text": "late"})  # the first terminal state stands
    assert progress(store, job, "host:1", " more", [7]) == -1
    record = store.get(job)
    assert (record["status"], record["text"]) == ("canceled", " pass")
    assert store.client.smembers(store.held_key("host:1")) == set()


def test_an_expired_lease_is_claimed_again_and_resumes(store: JobStore) -> None:
    job = submit(store)
    store.claim("host:1", lease=-1, max_deliveries=2, room=1, job_id=job)  # a lease already run out
    pipe = store.progress_pipeline()
    store.queue_progress(pipe, job, "host:1", lease_until=0, tokens=2, text=" pass", delta=" pass", out_ids=[5, 6])
    pipe.execute()
    [again] = store.claim("host:2", 30, 2, 8)
    assert (again.outcome, again.job_id, again.attempt, again.out_ids, again.text) == (
        ClaimOutcome.RUN,
        job,
        2,
        [5, 6],
        " pass",
    )
    assert progress(store, job, "host:1", " stale", [9]) == -1  # the old holder is refused
    assert store.get(job)["worker"] == "host:2"


def test_takeover_of_a_dead_holder_and_exhausted_runs(store: JobStore) -> None:
    jobs = [submit(store) for _ in range(3)]
    store.claim("host:1", 30, 2, 8)
    taken = store.claim("host:2", 30, 2, 8, takeover="host:1")
    assert sorted(c.job_id for c in taken if c.outcome == "run") == sorted(jobs)
    assert all(c.attempt == 2 for c in taken)
    [last] = store.claim("host:3", 30, 2, 1, job_id=jobs[0], takeover="host:2")
    assert last.outcome == "exhausted"
    record = store.get(jobs[0])
    assert record["status"] == "failed" and json.loads(record["error"])["code"] == "worker_lost"


def submit_for(store: JobStore, model: str, queue: str, cap: int | None = None) -> tuple[str, str]:
    """A generation job for `model` (as web submits it): (status, job id)."""
    job_id = new_job_id()
    message = task_message(GENERATE_TASK, job_id, queue, [job_id])
    fields = {"type": "generation", "model": model, "request": json.dumps({"prompt": "x", "max_new_tokens": 4})}
    result = store.submit(job_id, queue, message, fields, 100, engine=True, model=model, unserved_cap=cap)
    return result.status, job_id


def test_claims_are_per_model(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    store = JobStore(client, "t", ttl=600, reap_after=60, default_model="demo")
    assert store.pending_key("demo") == store.pending_key() == "t:pending:interactive"
    assert store.pending_key("tiny") == "t:pending:interactive:tiny"
    _, a = submit_for(store, "demo", INTERACTIVE_QUEUE)
    _, b = submit_for(store, "tiny", "interactive.tiny")
    assert store.client.zrange(store.pending_key("tiny"), 0, -1) == [b]
    assert [(c.outcome, c.job_id) for c in store.claim("host:1", 30, 2, 8)] == [("run", a)]  # default model
    assert [(c.outcome, c.detail) for c in store.claim("host:1", 30, 2, 1, job_id=b)] == [("other", "tiny")]
    assert store.get(b)["status"] == "queued" and store.client.llen(store.queue_key("interactive.tiny")) == 1
    [got] = store.claim("host:2", 1, 2, 8, model="tiny")
    assert (got.outcome, got.job_id) == ("run", b) and store.client.llen(store.queue_key("interactive.tiny")) == 0
    store.client.zadd(store.active_key(), {a: 0, b: 0})  # both leases ran out (their workers vanished)
    for job in (a, b):
        store.client.hset(store.key(job), "lease_until", "0")
    assert [c.job_id for c in store.claim("host:3", 30, 2, 8, model="tiny") if c.outcome == "run"] == [b]
    assert [c.job_id for c in store.claim("host:4", 30, 2, 8) if c.outcome == "run"] == [a]
    _, c = submit_for(store, "tiny", "interactive.tiny")
    assert store.cancel(c) == "canceled" and store.client.zcard(store.pending_key("tiny")) == 0


def test_submit_caps_a_model_no_live_worker_serves(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    store = JobStore(client, "t", ttl=600, reap_after=60, default_model="demo")
    assert [submit_for(store, "ghost", "interactive.ghost", cap=2)[0] for _ in range(3)] == ["ok", "ok", "unavailable"]
    registry.publish(client, "t", "host:9", {"alias": "ghost", "state": "loading"}, ttl=30)  # a live worker
    assert submit_for(store, "ghost", "interactive.ghost", cap=2)[0] == "ok"
    registry.remove(client, "t", "host:9", "ghost")
    assert submit_for(store, "ghost", "interactive.ghost", cap=2)[0] == "unavailable"


def test_two_deployments_share_one_database_by_prefix(store: JobStore) -> None:
    """Every key of a deployment is under its prefix, the Celery queue lists too: two prefixes on one
    database never see each other's queues, pending sets or claims."""
    other = JobStore(store.client, "u", ttl=600, reap_after=60)
    mine, theirs = submit(store, "mine"), submit(other, "theirs")
    assert (
        store.queue_key(INTERACTIVE_QUEUE) == "t:interactive" and other.queue_key(INTERACTIVE_QUEUE) == "u:interactive"
    )
    assert store.client.llen("t:interactive") == 1 and store.client.llen("u:interactive") == 1
    assert store.client.llen(INTERACTIVE_QUEUE) == 0  # nothing on the unprefixed list
    assert [c.job_id for c in store.claim("host:1", 30, 2, 8)] == [mine]
    assert store.client.llen("t:interactive") == 0 and store.client.llen("u:interactive") == 1  # only its own wake-up
    assert [c.job_id for c in other.claim("host:2", 30, 2, 8)] == [theirs]
    assert all(k.startswith(("t:", "u:")) for k in store.client.keys("*")), store.client.keys("*")


def test_two_deployments_keep_batches_webhooks_files_and_workers_apart(server: RedisServer) -> None:
    """Batches, webhook deliveries and their attempt logs, uploaded files and worker registrations of two
    deployments on one database: every key is under its own prefix, and neither reads the other's."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    for prefix in ("t", "u"):
        settings = load_settings(environ={"QWEN_DEPLOY_ENV_FILE": "none.env"}, overrides={"key_prefix": prefix})
        batches, hooks = BatchStore(client, prefix, 600), WebhookStore(client, settings)
        batch_id = f"batch_{prefix}"
        fields = {
            "id": batch_id,
            "status": "completed",
            "created_at": repr(time.time()),
            "owner": "o",
            "webhook": "http://127.0.0.1:9/hook",
        }
        batches.create(batch_id, fields, ['{"line": 1}'], ['{"error": {}}'], [(BULK_QUEUE, "{}")])
        assert batches.chunk_tries(batch_id, 0) == 1 and not batches.chunk_recorded(batch_id, 0)
        assert batches.notify(batch_id)  # the batch.completed delivery
        assert hooks.claim() == [f"msg_{batch_id}_completed"]  # only its own deployment's due set
        attempt = hooks.deliver(f"msg_{batch_id}_completed")  # loopback is no allowed host: refused, logged
        assert attempt is not None and attempt.error and len(hooks.attempts("batch", batch_id)) == 1
        hooks.watch_output(f"job_{prefix}")
        FileStore(client, prefix, 600, "o").create("in.jsonl", "batch", "{}\n")
        registry.publish(client, prefix, f"host:{prefix}", {"alias": "m", "state": "ready"}, 30)
        client.incr(keys.model_loads_key(prefix))
    for prefix, other in (("t", "u"), ("u", "t")):
        assert BatchStore(client, prefix, 600).page("o", None, 10) == ([f"batch_{prefix}"], False)
        assert BatchStore(client, prefix, 600).get(f"batch_{other}") is None
        assert [w["name"] for w in registry.workers(client, prefix)] == [f"host:{prefix}"]
        assert len(FileStore(client, prefix, 600, "o").ids()) == 1
        assert client.zrange(keys.WebhookKeys(prefix).watch_key(), 0, -1) == [f"job_{prefix}"]
    found = client.keys("*")
    assert found and all(k.startswith(("t:", "u:")) for k in found), found
    shapes = {
        p: sorted(
            re.sub(rf"(?<=[:_]){p}(?=$|[:_])", "X", k.removeprefix(f"{p}:"))
            for k in found
            if k.startswith(f"{p}:") and ":file:" not in k
        )
        for p in ("t", "u")
    }
    assert shapes["t"] == shapes["u"], shapes  # the same keys on each side (file ids are random)
    assert {
        "batch:batch_X",
        "batch:batch_X:req",
        "batch:batch_X:out",
        "batch:batch_X:tries",
        "bulk",
        "owner:o:batch_index",
        "webhooks:watch",
        "webhook:msg_batch_X_completed",
        "batch:batch_X:webhooks",
        "owner:o:files",
        "workers",
        "worker:host:X",
        "model:m:workers",
        "stats:model_loads",
    } <= set(shapes["t"]), shapes["t"]


def test_submit_stores_every_field_byte_for_byte(store: JobStore) -> None:
    """The record's fields travel as one JSON argument; odd text arrives unchanged."""
    job_id = new_job_id()
    odd = 'é 😀 \x00 "quoted" \\back\\ \u2028 {"json": [1]} ' + "x" * 5000
    fields = {"type": "generation", "request": json.dumps({"prompt": odd}), "webhook": odd, "n": 3, "none": None}
    message = task_message(GENERATE_TASK, job_id, INTERACTIVE_QUEUE, [job_id])
    assert store.submit(job_id, INTERACTIVE_QUEUE, message, fields, 100, engine=True).status == "ok"
    record = store.get(job_id)
    assert record is not None
    assert record["webhook"] == odd and json.loads(record["request"]) == {"prompt": odd}
    assert record["n"] == "3" and "none" not in record and record["message"] == message
    assert record["status"] == "queued" and record["id"] == job_id


def test_queue_and_index_upkeep_go_through_named_methods(store: JobStore) -> None:
    """What the web and worker layers do to queues and the owner index, without the store's client."""
    first = submit(store)
    record = store.get(first)
    assert record is not None and store.queue_length(INTERACTIVE_QUEUE) == 1
    store.push_message(INTERACTIVE_QUEUE, "second")
    assert store.queue_length(INTERACTIVE_QUEUE) == 2
    assert store.client.lindex(store.queue_key(INTERACTIVE_QUEUE), 0) == "second"  # the end BRPOP reaches last
    store.client.zadd(store.index_key("k"), {"job_a": 0, "job_b": 0, "job_c": 0})
    store.forget_owned("k", ["job_a", "job_c"])
    store.forget_owned("k", [])
    assert store.owned_ids("k", None, 10) == ["job_b"]
