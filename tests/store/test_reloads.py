"""Model reload records and hand-backs on a real redis-server, without workers: one reload per model at a time,
one worker's turn at a time, wake-ups on the workers' own queues, vanished workers, a failed load, and a handed-back
job resumed by the next claim without counting as a failed run."""

from __future__ import annotations

import redis

from qwen_deploy import registry, reloads
from qwen_deploy.jobs import ClaimOutcome, JobStore
from qwen_deploy.keys import queue_key
from qwen_deploy.queues import engine_queue
from tests.store.test_store import progress, submit

P = "t"


def live(client: redis.Redis, *names: str) -> list[dict[str, object]]:
    """Registry records of live ready workers of the default model `m`."""
    for name in names:
        registry.publish(client, P, name, {"alias": "m", "state": "ready", "node": f"gen@{name}"}, ttl=30)
    return [w for w in registry.workers(client, P) if w["name"] in names]


def test_one_worker_at_a_time_then_succeeded(store: JobStore) -> None:
    client = store.client
    workers = sorted(live(client, "h:1", "h:2"), key=lambda w: str(w["name"]))
    record, created = reloads.create(client, P, "m", "v2", workers)
    assert created and record["status"] == "queued"
    assert [w["state"] for w in record["workers"]] == ["waiting", "waiting"]
    for name in ("h:1", "h:2"):  # each idle worker is woken on its own queue
        assert client.llen(queue_key(P, engine_queue(P, f"gen@{name}"))) == 1
    same, created = reloads.create(client, P, "m", "v3", workers)
    assert not created and same["id"] == record["id"]  # one reload of a model at a time

    assert reloads.due(client, P, "m", "h:1") == record["id"] == reloads.due(client, P, "m", "h:2")
    turn = reloads.take_turn(client, P, record["id"], "h:1", lease=60)
    assert turn is not None and turn["status"] == "running" and turn["path"] == "v2"
    assert reloads.due(client, P, "m", "h:2") is None  # the turn is h:1's
    assert reloads.take_turn(client, P, record["id"], "h:2", lease=60) is None
    client.delete(queue_key(P, engine_queue(P, "gen@h:2")))
    ended = reloads.end_turn(client, P, record["id"], "h:1", None, {"model": "m", "path": "v2", "since": 1.0}, 60)
    assert ended is not None and ended["status"] == "running"
    assert client.llen(queue_key(P, engine_queue(P, "gen@h:2"))) == 1  # the next one is woken
    assert reloads.weights(client, P, "m") == {"path": "v2", "reload": record["id"], "since": 1.0}
    assert reloads.take_turn(client, P, record["id"], "h:2", lease=60) is not None
    done = reloads.end_turn(client, P, record["id"], "h:2", None, {"model": "m", "path": "v2", "since": 2.0}, 60)
    assert done is not None and done["status"] == "succeeded" and done["completed_at"]
    assert [w["state"] for w in done["workers"]] == ["succeeded", "succeeded"]
    assert reloads.due(client, P, "m", "h:2") is None
    assert reloads.last(client, P, "m")["id"] == record["id"]  # type: ignore[index]
    assert 0 < client.ttl(f"{P}:reload:{record['id']}") <= 60
    _, created = reloads.create(client, P, "m", "v3", workers)
    assert created  # the next reload may start


def test_a_failed_load_fails_the_reload_and_skips_the_rest(store: JobStore) -> None:
    client = store.client
    record, _ = reloads.create(client, P, "m", "bad", live(client, "h:1", "h:2"))
    first = str(record["workers"][0]["worker"])
    assert reloads.take_turn(client, P, record["id"], first, lease=60) is not None
    failed = reloads.end_turn(client, P, record["id"], first, "SafetensorError: truncated", None, 60)
    assert failed is not None and failed["status"] == "failed"
    assert failed["error"] == {"code": "reload_failed", "message": f"worker {first}: SafetensorError: truncated"}
    assert sorted(w["state"] for w in failed["workers"]) == ["failed", "skipped"]
    assert reloads.weights(client, P, "m") is None  # new workers keep loading the configured weights
    assert reloads.due(client, P, "m", str(record["workers"][1]["worker"])) is None


def test_a_vanished_worker_is_gone_and_the_reload_ends(store: JobStore) -> None:
    client = store.client
    record, _ = reloads.create(client, P, "m", "v2", live(client, "h:1", "h:2"))
    registry.remove(client, P, "h:2", "m")  # h:2 stops before its turn
    assert reloads.take_turn(client, P, record["id"], "h:1", lease=60) is not None
    done = reloads.end_turn(client, P, record["id"], "h:1", None, {"model": "m", "path": "v2", "since": 1.0}, 60)
    assert done is not None and done["status"] == "succeeded"
    assert {w["worker"]: w["state"] for w in done["workers"]} == {"h:1": "succeeded", "h:2": "gone"}


def test_a_handed_back_job_resumes_first_and_is_no_failed_run(store: JobStore) -> None:
    queued, job = submit(store, "queued first"), submit(store)
    store.claim("h:1", 30, 2, 1, job_id=job)
    assert progress(store, job, "h:1", " pass", [5, 6]) == 0
    assert reloads.hand_back(store, [job, queued], "h:1", None) == 1  # only a job it holds
    assert progress(store, job, "h:1", " stale", [9]) == -1  # the old holder is refused
    assert store.get(job)["status"] == "running"
    [again] = store.claim("h:2", 30, 2, 1)  # ahead of the job queued before it
    assert (again.outcome, again.job_id, again.attempt, again.out_ids, again.text) == (
        ClaimOutcome.RUN,
        job,
        2,
        [5, 6],
        " pass",
    )
    assert reloads.hand_back(store, [job], "h:2", None) == 1  # handed back twice: no run lost
    [third] = store.claim("h:3", -1, 2, 1)  # a run whose worker is lost (its lease has run out)
    [fourth] = store.claim("h:4", -1, 2, 1)  # the second lost run: still within max_deliveries 2
    fifth = store.claim("h:5", 30, 2, 1)
    assert (third.job_id, third.attempt, fourth.attempt) == (job, 3, 4)
    assert [(c.outcome, c.job_id) for c in fifth] == [(ClaimOutcome.EXHAUSTED, job), (ClaimOutcome.RUN, queued)]
