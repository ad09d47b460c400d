"""Every route that takes an id checks its owner before any effect: another key's job, response, batch,
file or webhook log is a 404 and stays untouched; an id of another shape is a 404 without a Redis key
built from it (real redis-server, two keys, no worker)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import redis

from qwen_deploy.batches import BatchStore
from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.job_records import new_job_id
from qwen_deploy.jobs import JobStore
from qwen_deploy.queues import GENERATE_TASK, Lane, task_message
from tests.store.test_tenants import ADMIN, K1, K2, auth, make_app

INTERACTIVE_QUEUE = Lane.INTERACTIVE.queue


@pytest.fixture()
def http(server: RedisServer) -> Any:
    redis.Redis.from_url(server.url).flushdb()
    keys = {"api_keys": [K1, K2], "admin_keys": [ADMIN]}
    return make_app(server.url, web=keys, limits={"max_queued_unserved": 1000}).test_client()


@pytest.fixture()
def db(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def hexof(any_id: str) -> str:
    return any_id.split("_", 1)[1]


def test_another_keys_job_cannot_be_canceled_by_any_route(http: Any, db: redis.Redis) -> None:
    for owner in (K1, ADMIN):  # an admin's job (downloads and exports are jobs too) is no different
        job = http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(owner)).get_json()
        for path in (
            f"/v1/responses/resp_{hexof(job['id'])}/cancel",
            f"/v1/jobs/{job['id']}/cancel",
            f"/v1/jobs/{job['id']}/retry",
        ):
            answer = http.post(path, headers=auth(K2))
            assert answer.status_code == 404, path
            assert answer.get_json()["error"]["code"] == "not_found"
        record = db.hgetall(f"qd:job:{job['id']}")
        assert record["status"] == "queued" and "cancel" not in record
        assert http.get(f"/v1/jobs/{job['id']}", headers=auth(owner)).get_json()["status"] == "queued"
    assert len(db.keys("qd:job:*")) == 2  # no retry job was made either
    mine = http.post(f"/v1/responses/resp_{hexof(job['id'])}/cancel", headers=auth(ADMIN))
    assert mine.status_code == 200 and mine.get_json()["status"] == "cancelled"


def test_another_keys_batch_cannot_be_canceled(http: Any, db: redis.Redis) -> None:
    body = {"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}
    batch = http.post("/v1/batches", json=body, headers=auth(K1)).get_json()
    assert http.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(K2)).status_code == 404
    assert db.hget(f"qd:batch:{batch['id']}", "status") == "in_progress"


def test_the_cancel_scripts_refuse_another_owner(store: JobStore) -> None:
    job = new_job_id()
    message = task_message(GENERATE_TASK, job, INTERACTIVE_QUEUE, [job])
    fields = {"type": "generation", "request": '{"prompt": "x"}'}
    assert store.submit(job, INTERACTIVE_QUEUE, message, fields, 100, owner="owner-one", engine=True).status == "ok"
    assert store.cancel(job, "owner-two") == "missing"
    assert store.client.hget(store.key(job), "status") == "queued" and not store.client.hexists(
        store.key(job), "cancel"
    )
    assert store.cancel(job, "owner-one") == "canceled"
    batches = BatchStore(store.client, "t")
    fields = {"id": "batch_x", "status": "in_progress", "created_at": "1", "owner": "owner-one"}
    batches.create("batch_x", fields, [], [], [])
    assert batches.cancel("batch_x", "owner-two") == "missing"
    assert batches.status("batch_x") == "in_progress"
    assert batches.cancel("batch_x", "owner-one") == "in_progress" and batches.status("batch_x") == "cancelling"


def test_webhook_logs_are_the_owners_only(http: Any) -> None:
    job = http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).get_json()
    body = {"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}
    batch = http.post("/v1/batches", json=body, headers=auth(K1)).get_json()
    for path in (f"/v1/jobs/{job['id']}/webhooks", f"/v1/batches/{batch['id']}/webhooks"):
        assert http.get(path, headers=auth(K1)).get_json() == {"object": "list", "data": []}
        other = http.get(path, headers=auth(K2))
        assert other.status_code == 404 and other.get_json()["error"]["code"] == "not_found", path
    for path in (  # other shapes: never a key built from them (a stream or list key answers WRONGTYPE)
        f"/v1/jobs/{job['id']}:ev/webhooks",
        f"/v1/batches/{batch['id']}:req/webhooks",
        "/v1/jobs/JOB_x/webhooks",
    ):
        assert http.get(path, headers=auth(K1)).status_code == 404, path


def test_batch_output_files_check_the_id_shape_and_owner(http: Any, db: redis.Redis) -> None:
    body = {"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}
    batch = http.post("/v1/batches", json=body, headers=auth(K1)).get_json()
    out = f"file-out-{hexof(batch['id'])}"
    assert http.get(f"/v1/files/{out}", headers=auth(K1)).status_code == 200
    for path in (f"/v1/files/{out}", f"/v1/files/{out}/content"):
        assert http.get(path, headers=auth(K2)).status_code == 404, path
    for path in (f"/v1/files/{out}:req", f"/v1/files/{out}:tries/content", f"/v1/files/{out}:out"):
        assert http.get(path, headers=auth(K1)).status_code == 404, path
    db.hset(f"qd:batch:{batch['id']}:tries", "0", "1")  # a hash without an owner is nobody's batch
    assert http.get(f"/v1/files/{out}:tries", headers=auth(K1)).status_code == 404
    data = {"purpose": "batch", "file": (io.BytesIO(b"{}\n"), "in.jsonl")}
    upload = http.post("/v1/files", data=data, headers=auth(K1)).get_json()
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        assert http.open(f"/v1/files/{upload['id']}{path}", method=method, headers=auth(K2)).status_code == 404
    assert http.get(f"/v1/files/{upload['id']}/content", headers=auth(K1)).get_data() == b"{}\n"
