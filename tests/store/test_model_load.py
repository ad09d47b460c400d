"""A model that cannot load, at the store: its queued jobs fail with model_load_failed (never a job a
worker holds, nor another model's), and the registry says why (see qwen_deploy/model_load.py)."""

from __future__ import annotations

import redis

from qwen_deploy import registry
from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.jobs import JobStore
from qwen_deploy.model_load import MODEL_LOAD_FAILED, fail_pending, fail_queued, load_error
from tests.store.test_store import submit_for


def test_the_queued_jobs_of_a_model_that_cannot_load_fail_and_no_other(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    store = JobStore(client, "t", ttl=600, reap_after=60, default_model="demo")
    error = load_error("/models/missing", OSError("no such directory"))
    queued = [submit_for(store, "broken", "interactive.broken")[1] for _ in range(3)]
    other = submit_for(store, "demo", "interactive")[1]
    [held] = store.claim("host:1", 30, 2, 1, job_id=queued[0], model="broken")  # a worker claimed the first
    assert held.outcome == "run"
    assert fail_pending(store, "broken", error) == 2
    for job_id in queued[1:]:
        record = store.get(job_id)
        assert record["status"] == "failed"
        assert '"code": "model_load_failed"' in record["error"] and "'/models/missing'" in record["error"]
    assert store.get(queued[0])["status"] == "running" and store.get(other)["status"] == "queued"
    assert client.zcard(store.pending_key("broken")) == 0 and client.zcard(store.pending_key("demo")) == 1
    assert not fail_queued(store, queued[1], error)  # terminal: never rewritten
    assert store.finish(queued[0], "succeeded", {"text": "ok"}, holder="host:1")


def test_the_load_error_is_one_bounded_line_without_the_token() -> None:
    error = load_error("org/model", OSError("401 for token hf_secret123\n" + "x" * 2000), ("hf_secret123",))
    assert error["code"] == MODEL_LOAD_FAILED
    assert "hf_secret123" not in error["message"] and "\n" not in error["message"]
    assert error["message"].startswith("the model 'org/model' could not be loaded: OSError: 401 for token ***")
    assert len(error["message"]) < 600


def test_a_model_whose_every_worker_failed_to_load_reports_why(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    failed = {"alias": "broken", "state": "load_failed", "error": load_error("m", OSError("gone"))}
    registry.publish(client, "t", "host:1", failed, ttl=30)
    found = registry.workers(client, "t")
    assert registry.load_failure(found, "broken", False) == "the model 'm' could not be loaded: OSError: gone"
    registry.publish(client, "t", "host:2", {"alias": "broken", "state": "loading"}, ttl=30)
    assert registry.load_failure(registry.workers(client, "t"), "broken", False) is None  # one may still load
    assert registry.load_failure(found, "demo", True) is None
