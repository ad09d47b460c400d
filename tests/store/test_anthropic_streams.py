"""The Anthropic message stream without a worker (real redis-server, the app in-process): a failed job ends
the stream with an `error` event, a client that goes away cancels its job, and the open-stream cap
answers 429 `rate_limit_error` before any job exists."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from qwen_deploy.served import served_models
from web import create_app
from web.context import current_services

KEY = "k-anthropic-stream"
HEADERS = {"x-api-key": KEY}


@pytest.fixture()
def app(server: RedisServer) -> Any:
    redis.Redis.from_url(server.url).flushdb()
    settings = load_settings(
        environ={"REDIS_URL": server.url, "QWEN_DEPLOY_ENV_FILE": "no.env"},
        overrides={"web": {"api_keys": [KEY]}, "limits": {"max_queued_unserved": 100, "max_streams_per_key": 1}},
    )
    return create_app(settings)


def body(app: Any) -> dict[str, Any]:
    model = served_models(app.extensions["qwen_deploy"].settings)[0].alias
    return {"model": model, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def events(chunks: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in b"".join(chunks).decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_a_failed_job_ends_the_stream_with_an_error_event(app: Any) -> None:
    response = app.test_client().post("/v1/messages", json=body(app), headers=HEADERS, buffered=False)
    job_id = response.headers["X-Job-Id"]
    stream = response.response
    first = [next(stream) for _ in range(2)]  # message_start, ping: written before any token (blocks open as they come)
    with app.app_context():
        current_services().store.finish(job_id, "failed", {"error": {"code": "boom", "message": "the model broke"}})
    seen = events(first + list(stream))
    assert [name for name, _ in seen] == ["message_start", "ping", "error"]
    assert seen[0][1]["message"]["id"] == "msg_" + job_id.removeprefix("job_")
    error = seen[-1][1]
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "the model broke" in error["error"]["message"]


def test_leaving_cancels_the_job_and_the_cap_holds_until_then(app: Any) -> None:
    client = app.test_client()
    response = client.post("/v1/messages", json=body(app), headers=HEADERS, buffered=False)
    job_id = response.headers["X-Job-Id"]
    next(response.response)
    capped = client.post("/v1/messages", json=body(app), headers=HEADERS)
    assert capped.status_code == 429
    assert (
        capped.get_json()["error"]["type"] == "rate_limit_error"
        and "event streams" in capped.get_json()["error"]["message"]
    )
    listed = client.get("/v1/jobs", headers=HEADERS).get_json()["data"]
    assert [job["id"] for job in listed] == [job_id]  # the refused stream made no job
    response.close()
    assert client.get(f"/v1/jobs/{job_id}", headers=HEADERS).get_json()["status"] == "canceled"
    again = client.post("/v1/messages", json=body(app), headers=HEADERS, buffered=False)
    assert again.status_code == 200  # the slot was given back
    again.close()
