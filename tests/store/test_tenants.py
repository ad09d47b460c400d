"""Tenants: each key sees only its own jobs and batches, idempotency keys per owner and route, job
listing from the owner's index, admin routes, the Host check and the bind guard (real redis-server)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from typing import Any

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import ConfigError, load_settings
from tests.helpers import ROOT
from web import create_app

K1, K2, ADMIN = "k-tenant-one", "k-tenant-two", "k-admin-0"


def make_app(url: str, **sections: Any) -> Any:
    settings = load_settings(environ={"REDIS_URL": url, "QWEN_DEPLOY_ENV_FILE": "no.env"}, overrides=sections)
    return create_app(settings)


@pytest.fixture()
def http(server: RedisServer) -> Any:
    redis.Redis.from_url(server.url).flushdb()
    # no worker runs here: the jobs wait, past the small queue of a model no worker serves
    return make_app(
        server.url, web={"api_keys": [K1, K2], "admin_keys": [ADMIN]}, limits={"max_queued_unserved": 1000}
    ).test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_job_is_visible_only_to_its_key(http: Any, server: RedisServer) -> None:
    job = http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).get_json()
    stored = redis.Redis.from_url(server.url, decode_responses=True).hgetall(f"qd:job:{job['id']}")
    assert stored["owner"] == hashlib.sha256(K1.encode()).hexdigest()[:16]
    assert K1 not in str(stored)
    for method, path in (("GET", ""), ("GET", "?wait=0.1"), ("GET", "/events"), ("POST", "/cancel")):
        other = http.open(f"/v1/jobs/{job['id']}{path}", method=method, headers=auth(K2))
        assert other.status_code == 404, (method, path)
        assert other.get_json()["error"]["code"] == "not_found"
    assert http.get(f"/v1/jobs/{job['id']}", headers=auth(K1)).get_json()["status"] == "queued"
    assert http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(K1)).get_json()["status"] == "canceled"


def test_a_batch_is_visible_only_to_its_key(http: Any) -> None:
    body = {"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}
    batch = http.post("/v1/batches", json=body, headers=auth(K1)).get_json()
    for method, path in (("GET", ""), ("GET", "/results"), ("POST", "/cancel")):
        assert http.open(f"/v1/batches/{batch['id']}{path}", method=method, headers=auth(K2)).status_code == 404
    assert http.get(f"/v1/batches/{batch['id']}", headers=auth(K1)).get_json()["request_counts"]["total"] == 1


def test_idempotency_keys_are_per_owner_and_body(http: Any) -> None:
    body = {"prompt": "Beautiful is better than", "max_new_tokens": 3}
    first = http.post("/v1/jobs", json=body, headers={**auth(K1), "Idempotency-Key": "order-1"})
    again = http.post("/v1/jobs", json=body, headers={**auth(K1), "Idempotency-Key": "order-1"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    other_body = http.post(
        "/v1/jobs", json={**body, "max_new_tokens": 4}, headers={**auth(K1), "Idempotency-Key": "order-1"}
    )
    assert other_body.status_code == 422
    assert other_body.get_json()["error"] == {
        "type": "invalid_request_error",
        "code": "idempotency_key_reused",
        "message": other_body.get_json()["error"]["message"],
        "param": "Idempotency-Key",
    }
    other_key = http.post("/v1/jobs", json=body, headers={**auth(K2), "Idempotency-Key": "order-1"})
    assert other_key.status_code == 202 and "Idempotent-Replayed" not in other_key.headers
    assert other_key.get_json()["id"] != first.get_json()["id"]
    bad = http.post("/v1/jobs", json=body, headers={**auth(K1), "Idempotency-Key": "a b\x07"})
    assert bad.status_code == 422 and bad.get_json()["error"]["code"] == "invalid_idempotency_key"


def _pages(http: Any, key: str, query: str = "") -> tuple[list[str], int]:
    ids, after, pages = [], "", 0
    while True:
        page = http.get(f"/v1/jobs?limit=100{query}{after}", headers=auth(key))
        assert page.status_code == 200, page.get_json()
        body = page.get_json()
        assert body["object"] == "list"
        ids += [job["id"] for job in body["data"]]
        pages += 1
        if not body["has_more"]:
            return ids, pages
        after = f"&after={body['last_id']}"


def test_listing_pages_the_callers_own_jobs_newest_first(http: Any) -> None:
    mine = [
        http.post("/v1/jobs", json={"prompt": "x", "max_new_tokens": 1}, headers=auth(K1)).get_json()["id"]
        for _ in range(150)
    ]
    theirs = [
        http.post("/v1/jobs", json={"prompt": "y", "max_new_tokens": 1}, headers=auth(K2)).get_json()["id"]
        for _ in range(100)
    ]
    for job_id in mine[:30]:
        assert http.post(f"/v1/jobs/{job_id}/cancel", headers=auth(K1)).status_code == 202
    newest_first = lambda ids: sorted(ids, reverse=True)  # noqa: E731  ids sort by creation ms (ties: random part)
    ids, pages = _pages(http, K1)
    assert ids == newest_first(mine) and pages == 2
    ids, pages = _pages(http, K2)
    assert ids == newest_first(theirs) and pages == 1
    assert _pages(http, K1, "&status=canceled")[0] == newest_first(mine[:30])
    assert _pages(http, K1, "&status=queued&type=generation")[0] == newest_first(mine[30:])
    assert _pages(http, K2, "&status=canceled")[0] == []
    assert _pages(http, K1, "&type=download")[0] == []
    for bad in ("limit=0", "limit=101", "limit=%C2%B2", "limit=1e3", "after=job_%00", "status=done", "x=1"):
        response = http.get(f"/v1/jobs?{bad}", headers=auth(K1))
        assert response.status_code == 422, bad


def test_admin_routes_need_an_admin_key_and_probes_stay_open(http: Any) -> None:
    for method, path, body in (
        ("POST", "/v1/models/downloads", {"repo_id": "org/m"}),
        ("POST", "/v1/models/exports", {"checkpoint": "c", "base": "b", "out": "o"}),
        ("GET", "/metrics", None),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "missing"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"}),
        ("POST", "/v1/register_model", {"model_name": "m", "model_path": "missing"}),
        ("POST", "/v1/unregister_model", {"model_name": "m"}),
    ):
        refused = http.open(path, method=method, json=body, headers=auth(K1))
        assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "admin_required", path
        assert http.open(path, method=method, json=body, headers=auth(ADMIN)).status_code in (200, 202, 404, 422), path
    assert http.get("/readyz").get_json()["error"]["code"] == "no_worker"  # open: not 401
    assert http.get("/livez").status_code == 200
    assert http.get("/v1/jobs").status_code == 401


def test_untrusted_host_is_refused_but_probes_answer(http: Any) -> None:
    evil = http.get("/v1/jobs", headers={**auth(K1), "Host": "rebind.example:8000"})
    assert evil.status_code == 400 and evil.get_json()["error"]["code"] == "untrusted_host"
    assert http.get("/livez", headers={"Host": "10.1.2.3:8000"}).status_code == 200
    assert http.get("/v1/jobs", headers={**auth(K1), "Host": "127.0.0.1:8000"}).status_code == 200


def test_open_non_loopback_bind_refuses_to_start(server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        make_app(server.url, web={"host": "0.0.0.0"})
    assert make_app(server.url, web={"host": "0.0.0.0", "allow_unauthenticated": True})
    assert make_app(server.url, web={"host": "0.0.0.0", "api_keys": [K1]})
    assert make_app(server.url, web={"host": "::1"})
    env = {"REDIS_URL": server.url, "QWEN_DEPLOY_ENV_FILE": "no.env", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "qwen_deploy.cli", "web", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "allow_unauthenticated" in out.stderr


def test_empty_keys_are_rejected(server: RedisServer) -> None:
    for section in ({"api_keys": [""]}, {"api_keys": ["  "]}, {"admin_keys": [""]}):
        with pytest.raises(ConfigError, match="web.(api|admin)_keys"):
            make_app(server.url, web=section)


@pytest.mark.parametrize("raw", ['["sekrit-1", "sekrit-2"', "{sekrit-1: [", '["sekrit-1", 5]', '[["sekrit-1"]]'])
def test_a_bad_key_list_never_prints_the_keys(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"QWEN_DEPLOY_WEB__API_KEYS": raw, "QWEN_DEPLOY_ENV_FILE": "no.env"})
    message = str(info.value)
    assert "sekrit" not in message
    assert "QWEN_DEPLOY_WEB__API_KEYS" in message


def test_files_and_batch_listings_are_per_key(http: Any) -> None:
    import io

    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}\n'
    up = http.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(line), "in.jsonl")}, headers=auth(K1))
    assert up.status_code == 200, up.get_json()
    file_id = up.get_json()["id"]
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert http.get(path, headers=auth(K2)).status_code == 404
        assert http.get(path, headers=auth(K1)).status_code == 200
    assert http.delete(f"/v1/files/{file_id}", headers=auth(K2)).status_code == 404
    assert [f["id"] for f in http.get("/v1/files", headers=auth(K1)).get_json()["data"]] == [file_id]
    assert http.get("/v1/files", headers=auth(K2)).get_json()["data"] == []
    batch = http.post(
        "/v1/batches", json={"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}, headers=auth(K1)
    ).get_json()
    assert [b["id"] for b in http.get("/v1/batches", headers=auth(K1)).get_json()["data"]] == [batch["id"]]
    assert http.get("/v1/batches", headers=auth(K2)).get_json()["data"] == []
    output = "file-out-" + batch["id"].removeprefix("batch_")
    assert http.get(f"/v1/files/{output}", headers=auth(K2)).status_code == 404
