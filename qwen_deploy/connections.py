"""Redis clients and the job store, one connection pool per process and URL.

`redis_url` is either a plain `redis://[:password@]host:port/db` (or `rediss://`, `unix://`) or, for a
Sentinel-managed master, kombu's form `sentinel://[:password@]h1:26379[/db];sentinel://h2:26379;…` with the
master's name in `redis_master_name`. A Sentinel client asks the sentinels for the master on every new
connection and drops a connection whose server turned into a replica, so it follows a failover by itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from qwen_deploy.config import Settings
from qwen_deploy.jobs import JobStore
from qwen_deploy.served import default_alias

SENTINEL_SCHEME = "sentinel://"
SENTINEL_TIMEOUT_S = 0.5  # one sentinel's answer; the next one is asked when it does not come
CONNECT_TIMEOUT_S = 2.0
# Errors that mean "no writable master right now" (Redis restarting, a failover under way: READONLY from a
# demoted master; MasterNotFoundError is a ConnectionError): answered 503 + Retry-After by the web.
UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError)


@dataclass(frozen=True)
class SentinelURL:
    hosts: tuple[tuple[str, int], ...]
    password: str | None
    username: str | None
    db: int


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith(SENTINEL_SCHEME)


def parse_sentinel(url: str) -> SentinelURL:
    """The sentinels of a kombu-style URL; the password and db come from the first part that has one."""
    hosts: list[tuple[str, int]] = []
    password = username = None
    db = 0
    for part in filter(None, (p.strip() for p in url.split(";"))):
        if not is_sentinel(part):
            raise ValueError(f"every part of a Sentinel URL starts with {SENTINEL_SCHEME}")
        split = urlsplit(part)
        if not split.hostname:
            raise ValueError("a Sentinel URL part has no host")
        hosts.append((split.hostname, split.port or 26379))
        if split.password and password is None:
            password, username = unquote(split.password), unquote(split.username) if split.username else None
        if split.path.strip("/"):
            db = int(split.path.strip("/"))
    if not hosts:
        raise ValueError("a Sentinel URL names no sentinel")
    return SentinelURL(tuple(hosts), password, username, db)


def sentinel_options() -> dict[str, object]:
    """How a sentinel is asked: a short timeout and no retry, so a dead sentinel costs 0.5 s at most before
    the next one is asked (redis-py's default retry backs off 1 + 2 + 4 s on each dead one)."""
    return {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }


@functools.cache
def _sentinel(hosts: tuple[tuple[str, int], ...]) -> Sentinel:
    return Sentinel(list(hosts), sentinel_kwargs=sentinel_options())


def connect(
    url: str,
    master_name: str = "mymaster",
    *,
    socket_timeout: float | None = 10.0,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    max_connections: int | None = None,
) -> redis.Redis:
    """A client (decoded responses) for a plain or a Sentinel URL. Not cached: see `redis_client`."""
    if not is_sentinel(url):
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            health_check_interval=30,
            max_connections=max_connections,
        )
    parsed = parse_sentinel(url)
    # Two quick retries ride over a dropped connection to a demoted master; a longer outage raises at
    # once (the web answers 503, the workers retry on their own schedule), never a request hanging.
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=2)
    extra = {"max_connections": max_connections} if max_connections else {}
    return _sentinel(parsed.hosts).master_for(
        master_name,
        redis_class=redis.Redis,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        password=parsed.password,
        username=parsed.username,
        db=parsed.db,
        health_check_interval=30,
        retry=retry,
        **extra,
    )


@functools.cache
def _client(url: str, master_name: str, socket_timeout: float, max_connections: int) -> redis.Redis:
    return connect(url, master_name, socket_timeout=socket_timeout, max_connections=max_connections)


def settings_client(settings: Settings, socket_timeout: float | None = 10.0) -> redis.Redis:
    """A fresh client for the configured Redis (short-lived commands: doctor, healthcheck)."""
    return connect(settings.redis_url, settings.redis_master_name, socket_timeout=socket_timeout)


def redis_client(settings: Settings) -> redis.Redis:
    """A client whose socket timeout outlasts the longest blocking read (long-poll), with a pool as
    large as the open connections a web process serves (each stream or long-poll blocks one)."""
    return _client(
        settings.redis_url,
        settings.redis_master_name,
        settings.limits.max_wait + 10.0,
        settings.web.worker_connections + 64,
    )


def job_store(settings: Settings) -> JobStore:
    store = JobStore(
        redis_client(settings),
        settings.key_prefix,
        settings.limits.result_ttl,
        settings.limits.reap_after,
        default_model=default_alias(settings),
    )
    store.wait_replicas, store.wait_ms = settings.wait_replicas, settings.redis_wait_ms
    store.max_batch = settings.engine.max_batch
    return store


def reset_after_fork() -> None:
    """Drop pooled connections inherited from a parent process."""
    _client.cache_clear()
    _sentinel.cache_clear()
