"""Sentinel URLs and settings, and the web's answer when no master is writable (no Redis needed; the
failover itself: tests/e2e/test_sentinel.py)."""

from __future__ import annotations

import pytest
import redis
import redis.sentinel

from qwen_deploy.config import Settings, load_settings
from qwen_deploy.connections import is_sentinel, parse_sentinel


def test_sentinel_urls_are_parsed_like_kombu() -> None:
    url = "sentinel://:s%40cret@h1:26379/2;sentinel://h2;sentinel://h3:26380"
    parsed = parse_sentinel(url)
    assert is_sentinel(url) and not is_sentinel("redis://h:6379/0")
    assert parsed.hosts == (("h1", 26379), ("h2", 26379), ("h3", 26380))
    assert (parsed.password, parsed.db) == ("s@cret", 2)
    with pytest.raises(ValueError, match="starts with"):
        parse_sentinel("sentinel://h1:26379;redis://h2:6379")


def test_submits_wait_for_a_replica_behind_sentinel_by_default() -> None:
    def settings(**environ: str) -> Settings:
        return load_settings(environ={"QWEN_DEPLOY_ENV_FILE": "no.env", **environ})

    assert settings(REDIS_URL="sentinel://h1:26379;sentinel://h2:26379").wait_replicas == 1
    assert settings(REDIS_URL="redis://h:6379/0").wait_replicas == 0
    assert settings(REDIS_URL="sentinel://h1", QWEN_DEPLOY_REDIS_WAIT_REPLICAS="0").wait_replicas == 0
    assert settings(QWEN_DEPLOY_REDIS_MASTER_NAME="prod").redis_master_name == "prod"


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("refused"),
        redis.exceptions.TimeoutError("slow"),
        redis.exceptions.ReadOnlyError("READONLY"),
        redis.sentinel.MasterNotFoundError("No master found for 'mymaster'"),
    ],
)
def test_no_writable_master_is_503_with_retry_after(error: Exception) -> None:
    from web import create_app

    app = create_app(load_settings(environ={"QWEN_DEPLOY_ENV_FILE": "no.env", "REDIS_URL": "sentinel://h1"}))

    def boom() -> None:
        raise error

    app.add_url_rule("/boom", "boom", boom)
    resp = app.test_client().get("/boom")
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert resp.get_json()["error"]["code"] == "redis_unavailable"
