"""Lifecycle transitions on a real redis-server, without workers: priorities in the claim order,
deadlines (at claim time and by the sweep), purge, queue positions and the start estimate."""

from __future__ import annotations

import json
import time

import pytest

from qwen_deploy.errors import BadRequest
from qwen_deploy.job_records import new_job_id
from qwen_deploy.jobs import JobStore, SubmitResult
from qwen_deploy.lifecycle import current, done_times_key, purge, sweep_deadlines, with_positions
from qwen_deploy.queues import GENERATE_TASK, Lane, task_message
from tests.helpers import wait_until
from web.job_options import parse_duration

INTERACTIVE_QUEUE = Lane.INTERACTIVE.queue


def submit_result(
    store: JobStore, prompt: str = "hi", priority: str = "normal", deadline: float | None = None
) -> SubmitResult:
    job_id = new_job_id()
    message = task_message(GENERATE_TASK, job_id, INTERACTIVE_QUEUE, [job_id])
    fields = {"type": "generation", "request": json.dumps({"prompt": prompt, "max_new_tokens": 4})}
    result = store.submit(
        job_id, INTERACTIVE_QUEUE, message, fields, 100, engine=True, priority=priority, deadline=deadline
    )
    assert result.status == "ok" and result.job_id == job_id
    return result


def submit(store: JobStore, prompt: str = "hi", priority: str = "normal", deadline: float | None = None) -> str:
    return submit_result(store, prompt, priority, deadline).job_id


def test_claims_take_high_then_normal_then_low_fifo_within(store: JobStore) -> None:
    low = submit(store, "low", "low")
    normal1 = submit(store, "n1")
    high1 = submit(store, "h1", "high")
    normal2 = submit(store, "n2", "normal")
    high2 = submit(store, "h2", "high")
    claims = store.claim("host:1", lease=30, max_deliveries=2, room=8)
    assert [c.job_id for c in claims] == [high1, high2, normal1, normal2, low]
    assert store.get(low)["priority"] == "low"


def test_fair_queueing_puts_a_new_key_ahead_of_another_keys_backlog(store: JobStore) -> None:
    def fair(owner: str, priority: str = "normal") -> str:
        job_id = new_job_id()
        message = task_message(GENERATE_TASK, job_id, INTERACTIVE_QUEUE, [job_id])
        fields = {"type": "generation", "request": json.dumps({"prompt": owner, "max_new_tokens": 64})}
        result = store.submit(
            job_id,
            INTERACTIVE_QUEUE,
            message,
            fields,
            1000,
            owner=owner,
            engine=True,
            priority=priority,
            fair_cost=0.64,
        )
        assert result.status == "ok"
        return job_id

    flood = [fair("a") for _ in range(30)]
    b1, b2 = fair("b"), fair("b")
    urgent = fair("a", "high")
    order = [c.job_id for c in store.claim("host:1", lease=30, max_deliveries=2, room=40)]
    assert order[0] == urgent  # priority still comes first
    assert order[1:].index(b1) <= 1 and order[1:].index(b2) <= 3  # b waits for a job or two of a's, not 30
    assert [j for j in order if j in flood] == flood  # each key keeps its FIFO order
    assert set(order) == {*flood, b1, b2, urgent}


def test_a_job_past_its_deadline_is_never_claimed(store: JobStore) -> None:
    late = submit(store, "late", deadline=time.time() + 0.3)
    fine = submit(store, "fine", deadline=time.time() + 600)
    time.sleep(0.35)  # the deadline passes while no worker claims
    claims = store.claim("host:1", 30, 2, 8)
    assert [(c.outcome, c.job_id) for c in claims] == [("skip", late), ("run", fine)]
    assert claims[1].detail and float(claims[1].detail) > time.time()  # a run carries its deadline to the engine
    record = store.get(late)
    assert record["status"] == "canceled" and json.loads(record["error"])["code"] == "deadline_exceeded"
    assert record["deliveries"] == "0" and store.client.ttl(store.key(late)) > 0
    assert store.client.zscore(store.deadlines_key(), late) is None
    assert store.client.zscore(store.pending_key(), late) is None


def test_the_sweep_closes_queued_jobs_and_flags_running_ones(store: JobStore) -> None:
    running = submit(store, "running", deadline=time.time() + 0.5)
    assert store.claim("host:1", 30, 2, 1)[0].job_id == running
    queued = [submit(store, f"q{i}", deadline=time.time() + 0.5) for i in range(3)]
    later = submit(store, "later", deadline=time.time() + 600)
    assert sweep_deadlines(store) == []  # nothing due yet
    closed: list[str] = []
    wait_until(lambda: closed.extend(sweep_deadlines(store)) or len(closed) == 3, 10, what="the sweep")
    assert sorted(closed) == sorted(queued)
    assert all(store.get(j)["status"] == "canceled" for j in queued)
    assert store.get(running)["status"] == "running" and store.get(running)["cancel"] == "1"
    assert store.get(later)["status"] == "queued"
    assert store.client.zrange(store.deadlines_key(), 0, -1) == [later]
    assert store.client.zrange(store.pending_key(), 0, -1) == [later]


def test_a_read_closes_a_late_queued_job(store: JobStore) -> None:
    job = submit(store, deadline=time.time() + 0.2)
    time.sleep(0.25)
    assert current(store, store.get(job))["status"] == "canceled"


def test_purge_ends_only_queued_jobs_of_that_queue(store: JobStore) -> None:
    running = submit(store, "r")
    store.claim("host:1", 30, 2, 1)
    queued = [submit(store, f"q{i}") for i in range(7)]
    assert purge(store, INTERACTIVE_QUEUE, pending=True) == 7
    assert purge(store, INTERACTIVE_QUEUE, pending=True) == 0
    assert store.get(running)["status"] == "running"
    for job in queued:
        record = store.get(job)
        assert record["status"] == "canceled" and json.loads(record["error"])["code"] == "purged"
    assert store.client.zcard(store.pending_key()) == 0 and store.client.zcard(store.active_key()) == 1
    assert purge(store, "convert", pending=False) == 0  # the running generation job is not on that queue


def test_positions_decrease_as_jobs_are_claimed_and_the_estimate_follows_completions(store: JobStore) -> None:
    ids = [submit(store, f"p{i}") for i in range(5)]

    def positions() -> list[int | None]:
        return [j["queue_position"] for j in with_positions(store, [_job(store, i) for i in ids])]

    assert positions() == [0, 1, 2, 3, 4]
    fresh = submit_result(store)
    assert (fresh.position, fresh.rate) == (5, None)  # SUBMIT answers the new job's standing itself
    assert with_positions(store, [_job(store, ids[4])])[0]["estimated_start_seconds"] is None  # no completions yet
    first = store.claim("host:1", 30, 2, 2)
    assert positions() == [None, None, 0, 1, 2]
    for c in first:
        assert store.finish(c.job_id, "succeeded", {"text": "x"}, holder="host:1")
    estimate = with_positions(store, [_job(store, ids[4])])[0]["estimated_start_seconds"]
    assert estimate == pytest.approx(3 / (2 / 60), rel=0.01)  # 2 completions in the last minute, 2 jobs ahead
    high = submit(store, "urgent", "high")
    assert with_positions(store, [_job(store, high)])[0]["queue_position"] == 0
    assert positions()[2:] == [1, 2, 3]


def test_a_job_read_queued_then_claimed_is_read_again_not_left_queued_without_a_position(store: JobStore) -> None:
    """A list or a GET reads records, then the pending set: a job claimed in between is shown as it is now."""
    ids = [submit(store, f"c{i}") for i in range(3)]
    stale = [_job(store, i) for i in ids]  # read while queued
    claimed = store.claim("host:1", 30, 2, 1)
    assert [c.job_id for c in claimed] == ids[:1]
    shown = with_positions(store, stale)
    assert [(j["status"], j["queue_position"]) for j in shown] == [("running", None), ("queued", 0), ("queued", 1)]
    assert shown[0]["attempts"] == 1


def _job(store: JobStore, job_id: str) -> dict[str, object]:
    from qwen_deploy.job_records import public_job

    return public_job(store.get(job_id) or {})


def test_the_estimate_counts_the_completions_of_the_last_minute(store: JobStore) -> None:
    ids = [submit(store, f"q{i}") for i in range(51)]  # the last one has 50 jobs ahead

    def eta(times: list[float]) -> object:
        store.client.delete(done_times_key(store))
        if times:
            store.client.rpush(done_times_key(store), *times)
        return with_positions(store, [_job(store, ids[-1])])[0]["estimated_start_seconds"]

    now = time.time()
    assert eta([]) is None
    assert eta([now - 100]) is None  # nothing in the last minute: unknown
    assert eta([now - 1, now - 10, now - 100]) == pytest.approx(51 / (2 / 60), abs=0.1)
    assert eta([now - i * 0.05 for i in range(256)]) == pytest.approx(51 / (256 / 12.75), abs=0.15)  # all recent
    assert eta([now - i * 0.05 for i in range(100)]) == pytest.approx(51 / (100 / 60), abs=0.1)  # all ever kept


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("45", 45),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("2m30s", 150),
        ("0.5", 0.5),
        (" 10s ", 10),
    ],
)
def test_cancel_after_durations(raw: str, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "s", "abc", "0s", "0", "-5", "1d", "5m5h", "90000", "25h", "1e3", "nan", "٣"])
def test_bad_cancel_after_is_a_400_naming_the_header(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_duration(raw)
    assert info.value.status_code == 400 and info.value.param == "Cancel-After"


def test_an_engine_with_a_free_row_means_the_job_starts_now(store_redis: object) -> None:
    """An idle server answers 0 s, whatever the completion history (one job a minute once read 60 s);
    an engine whose rows are all held falls back to the completion rate."""
    from qwen_deploy import registry

    store_redis.flushdb()  # type: ignore[attr-defined]
    store = JobStore(store_redis, "t", ttl=600, reap_after=60, default_model="m")  # type: ignore[arg-type]
    store.max_batch = 2
    store.client.lpush(done_times_key(store), time.time() - 5)  # one completion in the last minute

    def submit_m(prompt: str) -> SubmitResult:
        job_id = new_job_id()
        message = task_message(GENERATE_TASK, job_id, INTERACTIVE_QUEUE, [job_id])
        fields = {"type": "generation", "request": json.dumps({"prompt": prompt})}  # the default model: no field
        return store.submit(job_id, INTERACTIVE_QUEUE, message, fields, 100, engine=True)

    first = submit_m("a")
    assert (first.position, first.free) == (0, 0)  # no live worker: the rate decides (60 s)
    registry.publish(store.client, "t", "host:1", {"alias": "m", "state": "ready"}, 30)
    second = submit_m("b")
    assert (second.position, second.free) == (1, 2)
    shown = with_positions(store, [_job(store, first.job_id), _job(store, second.job_id)])
    assert [j["estimated_start_seconds"] for j in shown] == [0.0, 0.0]
    store.client.sadd(store.held_key("host:1"), "x", "y")  # the engine's two rows are taken
    shown = with_positions(store, [_job(store, second.job_id)])
    assert shown[0]["estimated_start_seconds"] == pytest.approx(2 / (1 / 60), rel=0.01)
