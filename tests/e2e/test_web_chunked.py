"""Chunked request bodies through gunicorn (which ends the body stream itself): one over the limit is a
413 and nothing is made, never a body cut at the limit and accepted (real redis-server and gunicorn, no
worker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import requests

from qwen_deploy.cli.deployment import Deployment
from qwen_deploy.cli.redis_server import free_port
from tests.helpers import ROOT

LINE = b'{"custom_id": "%03d", "body": {"prompt": "x"}}\n'
JSONL = {"Content-Type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("chunked")
    env = {
        "QWEN_DEPLOY_ENV_FILE": "no.env",
        "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml"),
        "QWEN_DEPLOY_LIMITS__MAX_BODY_BYTES": "4096",
        "QWEN_DEPLOY_BATCHES__MAX_BYTES": "4096",
    }
    deployment = Deployment(env, logs=tmp, cwd=ROOT, session=True, quick_stop=True)
    try:
        server = deployment.start_redis(data_dir=tmp / "redis", appendonly=False)
        deployment.start_web("127.0.0.1", free_port())
        yield deployment.wait_web(60), server.url
    finally:
        deployment.stop(timeout=30)


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    """A generator body: requests sends it with Transfer-Encoding: chunked and no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_chunked_body_over_the_limit_is_413(web: tuple[str, str]) -> None:
    url, redis_url = web
    over = b"".join(LINE % i for i in range(200))  # ~9 KB: cut at 4096 bytes it would still be whole lines
    refused = requests.post(url + "/v1/batches", data=chunks(over), headers=JSONL, timeout=30)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "body_too_large"
    assert refused.headers["X-Content-Type-Options"] == "nosniff"
    assert redis.Redis.from_url(redis_url).keys("qd:batch:*") == []
    within = b"".join(LINE % i for i in range(4096 // len(LINE % 0)))
    made = requests.post(url + "/v1/batches", data=chunks(within), headers=JSONL, timeout=30)
    assert made.status_code == 202 and made.json()["request_counts"]["total"] == 4096 // len(LINE % 0)
    prompt = b'{"prompt": "' + b"x" * 5000 + b'"}'
    job = requests.post(url + "/v1/jobs", data=chunks(prompt), headers={"Content-Type": "application/json"}, timeout=30)
    assert job.status_code == 413
