"""Bad input gets a clear 4xx with code/param/message and nothing is enqueued (real redis, no worker)."""

from __future__ import annotations

import json

import pytest

from qwen_deploy.cli.redis_server import RedisServer, free_port
from qwen_deploy.config import load_settings
from qwen_deploy.queues import Lane
from web import create_app

INTERACTIVE_QUEUE = Lane.INTERACTIVE.queue


def make_app(url: str, **sections: dict) -> object:
    settings = load_settings(environ={"REDIS_URL": url, "QWEN_DEPLOY_ENV_FILE": "no.env"}, overrides=sections)
    return create_app(settings)


@pytest.fixture()
def http(server: RedisServer):  # type: ignore[no-untyped-def]
    import redis

    redis.Redis.from_url(server.url).flushdb()
    return make_app(server.url).test_client()


def queued(server: RedisServer) -> int:
    import redis

    return int(redis.Redis.from_url(server.url).llen(f"qd:{INTERACTIVE_QUEUE}"))  # queues live under key_prefix


def error_of(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message", "param"}
    return body["error"]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"prompt": "x", "max_new_tokens": 513}, "max_new_tokens_too_large", "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 0}, "invalid_value", "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": "5"}, "invalid_type", "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 5.5}, "invalid_type", "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": True}, "invalid_type", "max_new_tokens"),
        ({"prompt": "x", "temperature": -1}, "invalid_value", "temperature"),
        ({"prompt": "x", "top_p": 0}, "invalid_value", "top_p"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "too_many_stop_strings", "stop"),
        ({"prompt": "x", "stop": [""]}, "invalid_value", "stop"),
        ({"prompt": "x", "stop": [1]}, "invalid_type", "stop"),
        ({"prompt": "x", "bogus": 1}, "unknown_field", "bogus"),
        ({"prompt": 42}, "invalid_type", "prompt"),
        ({}, "missing_prompt", "prompt"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "missing_prompt", "prompt"),
        ({"messages": []}, "invalid_value", "messages"),
        ({"messages": [{"role": "robot", "content": "y"}]}, "invalid_value", "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "missing_field", "messages.0.content"),
    ],
)
def test_invalid_bodies_are_422(http, server: RedisServer, body: dict, code: str, param: str) -> None:  # type: ignore[no-untyped-def]
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]
    assert queued(server) == 0


def test_body_not_an_object_is_422(http) -> None:  # type: ignore[no-untyped-def]
    response = http.post("/v1/jobs", json=["prompt"])
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_type"


def test_bad_json_is_400(http, server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    for raw in (b'{"prompt": ', b"\xff\xfe", b"[" * 100000):
        response = http.post("/v1/jobs", data=raw, content_type="application/json")
        assert response.status_code == 400
        assert error_of(response)["code"] == "invalid_json"
    assert queued(server) == 0


def test_wrong_content_type_is_415(http) -> None:  # type: ignore[no-untyped-def]
    response = http.post("/v1/jobs", data="prompt=x", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


def test_oversized_body_is_413(http, server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    response = http.post("/v1/jobs", json={"prompt": "x" * 2_000_000})
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"
    assert queued(server) == 0


def test_bad_wait_is_422(http) -> None:  # type: ignore[no-untyped-def]
    job_id = http.post("/v1/jobs", json={"prompt": "x"}).get_json()["id"]
    for wait in ("abc", "-1", "31"):
        response = http.get(f"/v1/jobs/{job_id}?wait={wait}")
        assert response.status_code == 422 and error_of(response)["param"] == "wait"


def test_accepted_job_is_recorded_before_it_is_queued(http, server: RedisServer) -> None:  # type: ignore[no-untyped-def]
    response = http.post("/v1/jobs", json={"prompt": "Beautiful is better than", "max_new_tokens": 7})
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == {"tokens": 0, "max_new_tokens": 7}
    assert queued(server) == 1
    again = http.get(f"/v1/jobs/{job['id']}").get_json()
    assert again["id"] == job["id"] and again["status"] == "queued"
    message = json.loads(__import__("redis").Redis.from_url(server.url).lindex(f"qd:{INTERACTIVE_QUEUE}", 0))
    assert message["content-type"] == "application/json"
    assert message["headers"]["id"] == job["id"]


def test_cancel_queued_and_409_after(http) -> None:  # type: ignore[no-untyped-def]
    job_id = http.post("/v1/jobs", json={"prompt": "x"}).get_json()["id"]
    first = http.post(f"/v1/jobs/{job_id}/cancel")
    assert first.status_code == 202 and first.get_json()["status"] == "canceled"
    second = http.post(f"/v1/jobs/{job_id}/cancel")
    assert second.status_code == 409 and error_of(second)["code"] == "job_finished"
    missing = http.post("/v1/jobs/job_nope/cancel")
    assert missing.status_code == 404


def test_full_queue_is_429_with_retry_after(server: RedisServer) -> None:
    import redis

    redis.Redis.from_url(server.url).flushdb()
    http = make_app(server.url, limits={"max_queue_depth": 2}).test_client()
    codes = [http.post("/v1/jobs", json={"prompt": "x"}).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    response = http.post("/v1/jobs", json={"prompt": "x"})
    assert error_of(response)["code"] == "queue_full"
    assert int(response.headers["Retry-After"]) >= 1
    assert queued(server) == 2


def test_redis_down_is_503() -> None:
    http = make_app(f"redis://127.0.0.1:{free_port()}/0").test_client()
    response = http.post("/v1/jobs", json={"prompt": "x"})
    assert response.status_code == 503
    assert error_of(response)["code"] == "redis_unavailable"
    ready = http.get("/readyz")
    assert ready.status_code == 503 and error_of(ready)["code"] == "redis_unavailable"
    assert http.get("/livez").status_code == 200


def test_readiness_without_worker_is_503(http) -> None:  # type: ignore[no-untyped-def]
    response = http.get("/readyz")
    assert response.status_code == 503 and error_of(response)["code"] == "no_worker"


def test_api_keys_guard_every_route_but_livez(server: RedisServer) -> None:
    http = make_app(server.url, web={"api_keys": ["k-123"]}).test_client()
    assert http.get("/livez").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}, {"Authorization": "k-123"}):
        response = http.post("/v1/jobs", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    ok = http.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer k-123"})
    assert ok.status_code == 202


def test_unknown_route_and_method_are_json(http) -> None:  # type: ignore[no-untyped-def]
    assert error_of(http.get("/v1/nothing"))["code"] == "not_found"
    response = http.delete("/v1/jobs")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


def test_batch_limits_on_bytes_and_lines(server: RedisServer) -> None:
    http = make_app(server.url, batches={"max_bytes": 2048, "max_lines": 3}).test_client()
    line = json.dumps({"custom_id": "a", "body": {"prompt": "x"}})
    big = "\n".join(json.dumps({"custom_id": str(i), "body": {"prompt": "x" * 500}}) for i in range(5))
    response = http.post("/v1/batches", data=big, content_type="application/x-ndjson")
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"
    assert "2048 bytes" in error_of(response)["message"]
    many = "\n".join(line.replace('"a"', f'"{i}"') for i in range(4))
    response = http.post("/v1/batches", data=many, content_type="application/x-ndjson")
    assert response.status_code == 422 and error_of(response)["code"] == "too_many_lines"
    ok = http.post("/v1/batches", data=line, content_type="application/x-ndjson")
    assert ok.status_code == 202 and ok.get_json()["request_counts"]["total"] == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt": "x", "stop": ["s"] * 10_000}, 422, "too_many_stop_strings"),
        ({"prompt": "x", "max_new_tokens": -1}, 422, "invalid_value"),
        ({"prompt": "x", "max_new_tokens": 10**30}, 422, "max_new_tokens_too_large"),
        ({"prompt": "x", "seed": 2**64}, 422, "invalid_value"),
        ({"prompt": "x", "temperature": "hot"}, 422, "invalid_type"),
        ({"prompt": "x", "top_k": 1.5}, 422, "invalid_type"),
        ({"prompt": "nul \u0000 and control \u0007\u001b chars"}, 202, None),
        ({"messages": [{"role": "user", "content": "\u0000"}]}, 202, None),
        ({"prompt\u0000": "x"}, 422, "unknown_field"),
    ],
)
def test_hostile_values_get_clear_answers(http, body: dict, status: int, code: str | None) -> None:  # type: ignore[no-untyped-def]
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == status
    if code:
        assert error_of(response)["code"] == code
    else:
        assert response.get_json()["status"] == "queued"


def test_hostile_paths_and_ids(http) -> None:  # type: ignore[no-untyped-def]
    for job_id in ("%00", "..%2F..%2Fetc", "job_" + "f" * 28, "x" * 5000, "job_%E2%80%AE"):
        assert http.get(f"/v1/jobs/{job_id}").status_code in (404, 410)
    assert http.get("/v1/jobs/job_x/events", headers={"Last-Event-ID": "0-0 OR 1"}).status_code in (404, 422)


def test_the_accepted_job_is_the_stored_job(http) -> None:  # type: ignore[no-untyped-def]
    created = http.post("/v1/jobs", json={"prompt": "x", "max_new_tokens": 3}).get_json()
    stored = http.get(f"/v1/jobs/{created['id']}").get_json()
    assert created == stored
