"""What one key may store: a batch from an uploaded file is counted before it is parsed, and per-key quotas on
stored file bytes and open batch bytes (real redis-server, in-process app, no worker)."""

from __future__ import annotations

import io
import json
from typing import Any

import redis

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
