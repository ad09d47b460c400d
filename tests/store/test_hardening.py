"""Hardening of the HTTP API: chunked bodies over the limit, odd query values and id shapes, HEAD on admin
routes, headers on every answer, what the open probe shows (real redis-server, no worker)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from tests.store.test_tenants import ADMIN, K1, auth, make_app


@pytest.fixture()
def http(server: RedisServer) -> Any:
    redis.Redis.from_url(server.url).flushdb()
    sections = {"web": {"api_keys": [K1], "admin_keys": [ADMIN]}, "limits": {"max_body_bytes": 4096}}
    return make_app(server.url, batches={"max_bytes": 4096}, **sections).test_client()


def chunked(http: Any, path: str, body: bytes, mimetype: str) -> Any:
    """A body without Content-Length, its end marked by the server (as gunicorn does for chunked bodies)."""
    return http.post(
        path,
        input_stream=io.BytesIO(body),
        headers={**auth(K1), "Content-Type": mimetype, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""},
    )


def test_a_chunked_body_over_the_limit_is_413_not_cut(http: Any, server: RedisServer) -> None:
    db = redis.Redis.from_url(server.url)
    prompt = json.dumps({"prompt": "x" * 5000}).encode()
    assert chunked(http, "/v1/jobs", prompt, "application/json").status_code == 413
    line = b'{"custom_id": "%03d", "body": {"prompt": "x"}}\n'
    lines = b"".join(line % i for i in range(200))  # ~9 KB: cut at 4096 it is still whole lines
    assert chunked(http, "/v1/batches", lines, "application/x-ndjson").status_code == 413
    assert db.keys("qd:batch:*") == [] and db.keys("qd:job:*") == []
    within = b"".join(line % i for i in range(4096 // len(line % 0)))
    made = chunked(http, "/v1/batches", within, "application/x-ndjson")
    assert made.status_code == 202 and made.get_json()["request_counts"]["total"] == 4096 // len(line % 0)
    assert chunked(http, "/v1/jobs", b'{"prompt": "x"}', "application/json").status_code == 202


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files?limit=%C2%B2",  # "²": isdigit() but not int()
        "/v1/files?limit=%D9%A1",
        "/v1/batches?limit=%C2%B2",
        "/v1/batches?limit=0",
        "/v1/responses/{resp}?stream=true&starting_after=--5",
        "/v1/responses/{resp}?stream=true&starting_after=%C2%B2",
        "/v1/responses/{resp}?stream=true&starting_after=-2",
    ],
)
def test_odd_counts_in_queries_are_400(http: Any, path: str) -> None:
    job = http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).get_json()
    answer = http.get(path.format(resp="resp_" + job["id"].removeprefix("job_")), headers=auth(K1))
    assert answer.status_code == 400, answer.get_data()[:300]
    error = answer.get_json()["error"]
    assert error["code"] == "invalid_value" and error["param"] in error["message"]


def test_response_ids_of_another_shape_are_404(http: Any, server: RedisServer) -> None:
    job = http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).get_json()
    resp = "resp_" + job["id"].removeprefix("job_")
    for method, path in (
        ("GET", f"{resp}:ev"),
        ("POST", f"{resp}:ev/cancel"),
        ("GET", "resp_x"),
        ("POST", "nope/cancel"),
    ):
        answer = http.open(f"/v1/responses/{path}", method=method, headers=auth(K1))
        assert answer.status_code == 404, (method, path, answer.get_data()[:200])
    assert redis.Redis.from_url(server.url).hget(f"qd:job:{job['id']}", "status") == b"queued"


def test_head_on_an_admin_route_is_refused_like_get(http: Any) -> None:
    for method in ("GET", "HEAD"):
        assert http.open("/metrics", method=method, headers=auth(K1)).status_code == 403, method
        assert http.open("/metrics", method=method, headers=auth(ADMIN)).status_code == 200, method


def test_every_answer_says_nosniff(http: Any) -> None:
    job = http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1))
    answers = [
        job,
        http.get("/livez"),
        http.get("/readyz"),  # 503: no worker
        http.get("/v1/jobs/job_x", headers=auth(K1)),  # 404
        http.get("/v1/jobs"),  # 401
        http.post("/v1/jobs", data="{", headers={**auth(K1), "Content-Type": "application/json"}),  # 400
        http.get("/"),
        http.get(f"/v1/jobs/{job.get_json()['id']}/events", headers=auth(K1)),  # a stream
    ]
    for answer in answers:
        assert answer.headers.get("X-Content-Type-Options") == "nosniff", answer.request.path
        answer.close()


def test_readyz_shows_the_model_alias_never_its_path(http: Any, server: RedisServer, tmp_path: Any) -> None:
    from qwen_deploy import registry

    path = str(tmp_path / "secret-models" / "qwen")
    worker = {"state": "ready", "alias": "qwen", "model": {"name": path, "loaded_at": 1.0}}
    registry.publish(redis.Redis.from_url(server.url), "qd", "w-1", worker, ttl=30)
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["model"] == "qwen"
    assert "secret-models" not in ready.get_data(as_text=True)


def test_a_batchs_run_counts_expire_with_it(server: RedisServer) -> None:
    from qwen_deploy.batches import BatchStore

    db = redis.Redis.from_url(server.url)
    db.flushdb()
    batches = BatchStore(db, "t", ttl=600)
    assert batches.chunk_tries("batch_x", 0) == 1 and batches.chunk_tries("batch_x", 0) == 2
    assert 0 < db.ttl(batches.names.tries_key("batch_x")) <= 600


def test_an_ended_batchs_files_are_built_once(http: Any, server: RedisServer) -> None:
    db = redis.Redis.from_url(server.url, decode_responses=True)
    lines = {"requests": [{"custom_id": str(i), "body": {"prompt": 5}} for i in range(3)]}  # all invalid: it ends
    batch = http.post("/v1/batches", json=lines, headers=auth(K1)).get_json()
    assert batch["status"] == "completed" and batch["error_file_id"]

    def lranges() -> int:
        return int(db.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))

    first = http.get(f"/v1/files/{batch['error_file_id']}/content", headers=auth(K1)).get_data()
    assert first.count(b"\n") == 3
    before = lranges()
    for path in ("/content", "", "/content"):
        assert http.get(f"/v1/files/{batch['error_file_id']}{path}", headers=auth(K1)).status_code == 200
    assert http.get(f"/v1/files/{batch['error_file_id']}/content", headers=auth(K1)).get_data() == first
    assert lranges() == before  # no rebuild from the stored lines
    db.delete(f"qd:batch:{batch['id']}")  # once the batch is gone, so are its files
    assert http.get(f"/v1/files/{batch['error_file_id']}", headers=auth(K1)).status_code == 404
