"""Per-key caps (jobs and batches in flight, open streams), the bulk queue cap, Redis out of memory,
and the worker registry read without a keyspace scan (real redis-server, no worker)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
import requests
from werkzeug.serving import make_server

from qwen_deploy import registry
from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from tests.helpers import wait_until
from web import create_app

K1, K2 = "k-limits-one", "k-limits-two"


@pytest.fixture()
def r(server: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    return client


def make_http(url: str, **sections: Any) -> Any:
    web = {"api_keys": [K1, K2], **sections.pop("web", {})}
    settings = load_settings(
        environ={"REDIS_URL": url, "QWEN_DEPLOY_ENV_FILE": "no.env"}, overrides={"web": web, **sections}
    )
    return create_app(settings).test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def code_of(response: Any) -> tuple[int, str]:
    return response.status_code, response.get_json()["error"]["code"]


def test_jobs_in_flight_are_capped_per_key(server: RedisServer, r: redis.Redis) -> None:
    http = make_http(server.url, limits={"max_inflight_per_key": 3})
    ids = [http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).get_json()["id"] for _ in range(3)]
    refused = http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1))
    assert code_of(refused) == (429, "too_many_inflight") and int(refused.headers["Retry-After"]) >= 1
    assert http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K2)).status_code == 202  # another key
    assert http.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(K1)).status_code == 202
    assert http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).status_code == 202
    assert r.llen("qd:interactive") == 5


def test_batches_in_flight_and_the_bulk_queue_are_capped(server: RedisServer, r: redis.Redis) -> None:
    http = make_http(
        server.url, limits={"max_inflight_per_key": 2, "max_bulk_depth": 5}, batches={"micro_batch_size": 1}
    )
    one = {"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}
    first = http.post("/v1/batches", json=one, headers=auth(K1)).get_json()
    assert http.post("/v1/batches", json=one, headers=auth(K1)).status_code == 202
    assert code_of(http.post("/v1/batches", json=one, headers=auth(K1))) == (429, "too_many_inflight")
    assert http.post(f"/v1/batches/{first['id']}/cancel", headers=auth(K1)).status_code == 202
    r.hset(f"qd:batch:{first['id']}", "status", "cancelled")  # what the worker does once its chunk is skipped
    assert http.post("/v1/batches", json=one, headers=auth(K1)).status_code == 202
    many = {"requests": [{"custom_id": str(i), "body": {"prompt": "x"}} for i in range(3)]}
    refused = http.post("/v1/batches", json=many, headers=auth(K2))
    assert code_of(refused) == (429, "queue_full") and refused.headers["Retry-After"]
    assert r.llen("qd:bulk") == 3


def test_redis_out_of_memory_is_503_with_retry_after(tmp_path: Any) -> None:
    server = RedisServer(data_dir=tmp_path, appendonly=False).start()
    try:
        client = redis.Redis.from_url(server.url)
        http = make_http(server.url)
        assert http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).status_code == 202
        before = client.config_get("maxmemory")["maxmemory"]
        client.config_set("maxmemory", "1")
        try:
            for method, path, body in (
                ("POST", "/v1/jobs", {"prompt": "x"}),
                ("POST", "/v1/batches", {"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}),
            ):
                response = http.open(path, method=method, json=body, headers=auth(K1))
                assert code_of(response) == (503, "redis_out_of_memory"), path
                assert int(response.headers["Retry-After"]) > 0
        finally:
            client.config_set("maxmemory", before)
        assert http.post("/v1/jobs", json={"prompt": "x"}, headers=auth(K1)).status_code == 202
    finally:
        server.stop()


def test_open_streams_are_capped_per_key(server: RedisServer, r: redis.Redis) -> None:
    settings = load_settings(
        environ={"REDIS_URL": server.url, "QWEN_DEPLOY_ENV_FILE": "no.env"},
        overrides={"web": {"api_keys": [K1, K2]}, "limits": {"max_streams_per_key": 2}},
    )
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        job = requests.post(base + "/v1/jobs", json={"prompt": "x"}, headers=auth(K1), timeout=10).json()
        url = f"{base}/v1/jobs/{job['id']}/events"
        streams = [requests.get(url, headers=auth(K1), stream=True, timeout=10) for _ in range(2)]
        assert [s.status_code for s in streams] == [200, 200]
        refused = requests.get(url, headers=auth(K1), timeout=10)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        other = requests.get(url, headers=auth(K2), timeout=10)
        assert other.status_code == 404  # another key's cap is its own; the job is not theirs
        requests.post(f"{base}/v1/jobs/{job['id']}/cancel", headers=auth(K1), timeout=10)
        for stream in streams:  # the job ended: both streams end with `done` and free their slots
            assert b"event: done" in b"".join(stream.iter_content(None))
        wait_until(lambda: r.zcard(f"qd:owner:{_owner(K1)}:streams") == 0, 5, what="slots freed")
        again = requests.get(url, headers=auth(K1), timeout=10)
        assert again.status_code == 200 and "event: done" in again.text
    finally:
        server.shutdown()


def _owner(key: str) -> str:
    from web.auth import owner_of

    return owner_of(key)


def test_workers_are_read_from_one_sorted_set_without_scanning(server: RedisServer, r: redis.Redis) -> None:
    http = make_http(server.url)
    model = {"name": "m", "loaded_at": time.time()}
    registry.publish(r, "qd", "w-live", {"state": "ready", "model": model}, ttl=30)
    registry.publish(r, "qd", "w-gone", {"state": "ready", "model": model}, ttl=0.05)
    for i in range(200):  # unrelated keys a scan would walk through
        r.set(f"qd:noise:{i}", "x")
    wait_until(lambda: not r.exists("qd:worker:w-gone"), 5, what="the short record to lapse")
    scans = _calls(r, "scan")
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["workers"] == 1
    assert http.get("/v1/model", headers=auth(K1)).get_json()["workers"] == 1
    assert _calls(r, "scan") == scans
    assert r.zrange("qd:workers", 0, -1) == ["w-live"]  # the lapsed entry was pruned by score
    registry.remove(r, "qd", "w-live")
    assert r.zcard("qd:workers") == 0 and http.get("/readyz").status_code == 503


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
