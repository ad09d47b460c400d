"""Redis clients and the job store, one connection pool per process and URL."""

from __future__ import annotations

import functools

import redis

from qwen_deploy.config import Settings
from qwen_deploy.jobs import JobStore
from qwen_deploy.served import default_alias


@functools.cache
def _client(url: str, socket_timeout: float, max_connections: int) -> redis.Redis:
    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=socket_timeout,
        health_check_interval=30, max_connections=max_connections,
    )


def redis_client(settings: Settings) -> redis.Redis:
    """A client whose socket timeout outlasts the longest blocking read (long-poll), with a pool as
    large as the open connections a web process serves (each stream or long-poll blocks one)."""
    return _client(settings.redis_url, settings.limits.max_wait + 10.0, settings.web.worker_connections + 64)


def job_store(settings: Settings) -> JobStore:
    return JobStore(redis_client(settings), settings.key_prefix, settings.limits.result_ttl,
                    settings.limits.reap_after, default_model=default_alias(settings))


def reset_after_fork() -> None:
    """Drop pooled connections inherited from a parent process."""
    _client.cache_clear()
