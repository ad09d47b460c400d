"""The store layer: one redis-server per module (no workers, no web server); each test gets a flushed
database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.jobs import JobStore


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A bare redis-server for store-level tests (no workers, no web)."""
    s = RedisServer(data_dir=tmp_path_factory.mktemp("store-redis"), appendonly=False).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def store_redis(server: RedisServer) -> Iterator[redis.Redis]:
    """One client (and connection pool) for the module's stores: a test pays a FLUSHDB, not a new connection."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture()
def store(store_redis: redis.Redis) -> JobStore:
    """A JobStore on a flushed database of `server`."""
    store_redis.flushdb()
    return JobStore(store_redis, "t", ttl=600, reap_after=60)
