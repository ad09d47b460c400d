"""What one key may store: a batch from an uploaded file is counted before it is parsed, and per-key quotas on
stored file bytes and open batch bytes (real redis-server, in-process app, no worker)."""

from __future__ import annotations

import io
import json
from typing import Any

import redis

from qwen_deploy.batches import BatchStore
from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from web import create_app

K1, K2 = "k-quota-one", "k-quota-two"


def make_http(url: str, **sections: Any) -> Any:
    redis.Redis.from_url(url).flushdb()
    web = {"api_keys": [K1, K2], **sections.pop("web", {})}
    limits = {"max_queued_unserved": 1000, **sections.pop("limits", {})}
    settings = load_settings(
        environ={"REDIS_URL": url, "QWEN_DEPLOY_ENV_FILE": "no.env"},
        overrides={"web": web, "limits": limits, **sections},
    )
    return create_app(settings).test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def line(i: int, prompt: str = "x") -> bytes:
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/jobs", "body": {"prompt": prompt}}).encode()


def upload(http: Any, key: str, content: bytes) -> Any:
    data = {"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")}
    return http.post("/v1/files", data=data, headers=auth(key))


def test_a_file_over_max_lines_is_refused_before_any_line_is_parsed(server: RedisServer) -> None:
    http = make_http(server.url, batches={"max_lines": 3})
    # lines past the limit are not JSON: counted first, the file gets too_many_lines, not a parse error
    content = b"\n".join([line(1), line(2), line(3), b"{not json", b"\x7b" * 10]) + b"\n"
    file_id = upload(http, K1, content).get_json()["id"]
    response = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/jobs"}, headers=auth(K1))
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["code"] == "too_many_lines"
    assert "more than 3 lines" in response.get_json()["error"]["message"]
    assert http.get("/v1/batches", headers=auth(K1)).get_json()["data"] == []
    ok = upload(http, K1, b"\n".join([line(1), line(2), b"{not json"]) + b"\n").get_json()["id"]
    batch = http.post("/v1/batches", json={"input_file_id": ok, "endpoint": "/v1/jobs"}, headers=auth(K1))
    assert batch.status_code == 202 and batch.get_json()["request_counts"] == {"total": 3, "completed": 0, "failed": 1}


def test_a_file_with_a_line_over_max_line_bytes_is_refused_before_parsing(server: RedisServer) -> None:
    http = make_http(server.url, batches={"max_line_bytes": 200})
    content = line(1) + b"\n" + line(2, "y" * 300) + b"\n"
    file_id = upload(http, K1, content).get_json()["id"]
    response = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/jobs"}, headers=auth(K1))
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "line_too_long"


def quota_error(response: Any) -> dict[str, Any]:
    assert response.status_code == 429, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "quota_exceeded"
    return dict(error)


def test_stored_file_bytes_have_a_per_key_quota(server: RedisServer) -> None:
    http = make_http(server.url, files={"max_bytes_per_key": 4096})
    content = b"x" * 1000  # with its record, a file counts 2024 bytes: two fit in 4096
    first, second = (upload(http, K1, content).get_json()["id"] for _ in range(2))
    error = quota_error(upload(http, K1, content))
    assert "files.max_bytes_per_key" in error["message"] and "4096" in error["message"]
    assert [f["id"] for f in http.get("/v1/files", headers=auth(K1)).get_json()["data"]] == [second, first]
    assert upload(http, K2, content).status_code == 200  # another key's quota is its own
    assert http.delete(f"/v1/files/{first}", headers=auth(K1)).status_code == 200  # deleting frees its bytes
    assert upload(http, K1, content).status_code == 200
    quota_error(upload(http, K1, content))


def test_a_quota_entry_lapses_and_concurrent_reserves_never_pass_the_limit(server: RedisServer) -> None:
    import threading
    import time

    from qwen_deploy.quotas import Quota

    client = redis.Redis.from_url(server.url)
    client.flushdb()
    quota = Quota(client, "t", "o", "files")
    assert quota.reserve("old", 900, 1000, time.time() - 1) == (True, 0)
    assert quota.reserve("new", 900, 1000, time.time() + 60) == (True, 0)  # the lapsed entry left first
    assert quota.entries() == ["new"] and quota.release("new") == 0
    counted: list[bool] = []
    barrier = threading.Barrier(20)

    def take(i: int) -> None:
        barrier.wait()
        counted.append(Quota(client, "t", "o", "files").reserve(f"f{i}", 100, 1000, time.time() + 60)[0])

    threads = [threading.Thread(target=take, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counted.count(True) == 10 and counted.count(False) == 10
    assert int(client.get("t:owner:o:quota:files:total") or 0) == 1000
    assert all(client.ttl(k) > 0 for k in ("t:owner:o:quota:files", "t:owner:o:quota:files:total"))


def batch(http: Any, key: str, n: int = 1) -> Any:
    body = {"requests": [{"custom_id": f"c{i}", "body": {"prompt": "p" * 1200}} for i in range(n)]}
    return http.post("/v1/batches", json=body, headers=auth(key))


def test_running_batches_have_a_per_key_byte_quota_released_when_they_end(server: RedisServer) -> None:
    http = make_http(server.url, batches={"max_open_bytes_per_key": 2048})
    first = batch(http, K1)
    assert first.status_code == 202, first.get_json()
    error = quota_error(batch(http, K1))
    assert "batches.max_open_bytes_per_key" in error["message"] and "2048" in error["message"]
    assert batch(http, K2).status_code == 202  # another key's quota is its own
    store = BatchStore(redis.Redis.from_url(server.url), "qd")
    first_id = first.get_json()["id"]
    assert http.post(f"/v1/batches/{first_id}/cancel", headers=auth(K1)).status_code == 202
    quota_error(batch(http, K1))  # cancelling: its lines still wait in the queue
    store.chunk_done(first_id, 0, [{"id": "l1", "custom_id": "c0", "response": None, "error": {"code": "cancelled"}}])
    assert store.status(first_id) == "cancelled"  # its last chunk ended it: its bytes are free
    second = batch(http, K1)
    assert second.status_code == 202, second.get_json()
    quota_error(batch(http, K1))
    second_id = second.get_json()["id"]
    store.chunk_done(second_id, 0, [{"id": "l1", "custom_id": "c0", "response": {"status_code": 200}, "error": None}])
    assert store.status(second_id) == "completed"
    assert batch(http, K1).status_code == 202
    quota_error(batch(http, K1, 2))


def test_ended_jobs_keep_their_requests_up_to_a_bound_per_key(server: RedisServer) -> None:
    from qwen_deploy.lua import KEPT_REQUEST_BYTES

    http = make_http(server.url)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    prompt = "p" * 1_000_000  # a request of about 1 MB, under limits.max_body_bytes
    count = KEPT_REQUEST_BYTES // len(prompt) + 3

    def submit_and_cancel(key: str) -> str:
        job = http.post("/v1/jobs", json={"prompt": prompt}, headers=auth(key)).get_json()
        assert http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).get_json()["status"] == "canceled"
        return str(job["id"])

    theirs = submit_and_cancel(K2)
    mine = [submit_and_cancel(K1) for _ in range(count)]
    kept = [job_id for job_id in mine if client.hexists(f"qd:job:{job_id}", "request")]
    assert kept == mine[len(mine) - len(kept) :] and len(mine) - len(kept) >= 2, len(kept)  # the oldest lost theirs
    assert sum(client.hstrlen(f"qd:job:{job_id}", "request") for job_id in kept) <= KEPT_REQUEST_BYTES
    gone = http.post(f"/v1/jobs/{mine[0]}/retry", headers=auth(K1))
    assert gone.status_code == 409 and gone.get_json()["error"]["code"] == "request_not_kept"
    assert http.get(f"/v1/jobs/{mine[0]}", headers=auth(K1)).get_json()["status"] == "canceled"  # still readable
    assert http.post(f"/v1/jobs/{mine[-1]}/retry", headers=auth(K1)).status_code == 201
    assert http.post(f"/v1/jobs/{theirs}/retry", headers=auth(K2)).status_code == 201  # another key's are its own
