"""Checks of Redis: reachable, persistent, not evicting, with workers seen and queues not near full."""

from __future__ import annotations

import redis

from qwen_deploy import registry
from qwen_deploy.cli.common import redacted
from qwen_deploy.cli.doctor.context import Context, Outcome, passed
from qwen_deploy.connections import is_sentinel
from qwen_deploy.keys import queue_key
from qwen_deploy.queues import CONVERT, Lane

QUEUES = (Lane.INTERACTIVE.queue, Lane.BULK.queue, CONVERT)
QUEUE_WARN_FRACTION = 0.8  # of limits.max_queue_depth
FIX_REDIS = "start Redis or set REDIS_URL (qwen-deploy up starts an embedded one)"


def check_redis(ctx: Context) -> Outcome:
    client, error = ctx.connection
    if client is None:
        return "fail", f"{redacted(ctx.redis_url)} unreachable: {error}", FIX_REDIS
    version = client.info("server").get("redis_version", "?")
    if is_sentinel(ctx.redis_url):  # name the master the sentinels gave (it changes with a failover)
        host, port = client.connection_pool.get_master_address()  # type: ignore[attr-defined]
        return passed(
            f"{redacted(ctx.redis_url)} (master {ctx.master_name} at {host}:{port}, redis {version}; "
            "the replicas need AOF too)"
        )
    return passed(f"{redacted(ctx.redis_url)} (redis {version})")


def _config_get(client: redis.Redis, key: str) -> str | None:
    try:
        return str(client.config_get(key).get(key, ""))
    except redis.ResponseError:  # CONFIG disabled or renamed (managed Redis, `qwen-deploy up`)
        return None


def _ups_own(ctx: Context) -> bool:
    """Whether the Redis checked is the redis-server `up` started (AOF on, no eviction, CONFIG disabled)."""
    return ctx.up is not None and ctx.redis_url == ctx.up.get("redis_url")


def check_persistence(ctx: Context) -> Outcome:
    aof, save = _config_get(ctx.redis, "appendonly"), _config_get(ctx.redis, "save")
    if aof is None and _ups_own(ctx):
        return passed("AOF on (the redis-server qwen-deploy up started)")
    if aof is None:
        return "warn", "cannot read CONFIG (disabled?): check persistence by hand", "enable appendonly yes"
    if aof == "yes":
        return passed("AOF on (appendonly yes)")
    if save:
        return passed(f"RDB snapshots (save {save}); AOF would lose less")
    return (
        "warn",
        "no AOF and no RDB snapshots: jobs can be lost on restart",
        "run redis-server --appendonly yes (or CONFIG SET appendonly yes, then CONFIG REWRITE)",
    )


def check_eviction(ctx: Context) -> Outcome:
    policy = _config_get(ctx.redis, "maxmemory-policy")
    if policy is None and _ups_own(ctx):
        return passed("noeviction (the redis-server qwen-deploy up started)")
    if policy == "noeviction":
        return passed("maxmemory-policy noeviction")
    return "warn", f"maxmemory-policy {policy or 'unknown'}: jobs can be evicted", "set maxmemory-policy noeviction"


def check_workers(ctx: Context) -> Outcome:
    found = registry.workers(ctx.redis, ctx.settings.key_prefix)
    ready = [w for w in found if w.get("state") == "ready"]
    if ready:
        return passed(f"{len(ready)} ready, serving {ready[0].get('model', {}).get('name')}")
    detail = f"{len(found)} loading, none ready" if found else "no generation worker seen"
    return "warn", detail, "start one: qwen-deploy worker (or docker compose up -d worker)"


def check_queues(ctx: Context) -> Outcome:
    lengths = {q: int(ctx.redis.llen(queue_key(ctx.settings.key_prefix, q))) for q in QUEUES}
    detail = ", ".join(f"{q} {n}" for q, n in lengths.items())
    if lengths[Lane.INTERACTIVE.queue] >= QUEUE_WARN_FRACTION * ctx.settings.limits.max_queue_depth:
        return "warn", f"{detail}: near limits.max_queue_depth", "add workers or raise limits.max_queue_depth"
    return passed(detail)
