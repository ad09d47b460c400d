"""Open SSE streams per key: each holds a slot in `keys.streams_key` (a sorted set scored
by when the slot lapses), so one key cannot hold every connection (`limits.max_streams_per_key`).
One cap for every streaming route: job events, Responses streams (created or replayed) and chat or
text completion streams."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import redis

from qwen_deploy.errors import TooManyRequests
from qwen_deploy.keys import streams_key
from web.auth import current_owner
from web.context import current_services

Slot = tuple[redis.Redis, str, str]  # (client, the owner's streams key, this stream's token)


def open_stream() -> Slot:
    """Count an open stream against the caller's cap (429 `too_many_streams` past it)."""
    svc, now = current_services(), time.time()
    key, token = streams_key(svc.settings.key_prefix, current_owner()), secrets.token_hex(8)
    cap, ttl = svc.settings.limits.max_streams_per_key, svc.settings.limits.max_stream + 60
    pipe = svc.redis.pipeline(transaction=True)
    pipe.zremrangebyscore(key, "-inf", now)  # streams of a process that died lapse on their own
    pipe.zadd(key, {token: now + ttl})
    pipe.zcard(key)
    pipe.expire(key, int(ttl))
    count = pipe.execute()[2]
    if count > cap:
        svc.redis.zrem(key, token)
        raise TooManyRequests(
            f"this key has {cap} event streams open; close one first",
            code="too_many_streams",
            headers={"Retry-After": "5"},
        )
    return svc.redis, key, token


def counted(events: Iterator[str], slot: Slot) -> Iterator[str]:
    """The stream, releasing its slot when it ends or the client goes away."""
    try:
        yield from events
    finally:
        try:
            slot[0].zrem(slot[1], slot[2])
        except redis.RedisError:
            pass  # the slot lapses at its score
