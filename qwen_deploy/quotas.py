"""Per-owner byte quotas kept in Redis (stored files, open batches): entries are added, released and lapse
atomically in `lua/quota.lua`, so two requests at once cannot both pass the limit."""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from qwen_deploy.job_records import as_text
from qwen_deploy.keys import quota_keys
from qwen_deploy.lua import script


class Quota:
    """One owner's quota of one kind (`files`, `batches`)."""

    def __init__(self, client: redis.Redis, prefix: str, owner: str, kind: str) -> None:
        self.r, self.keys = client, list(quota_keys(prefix, owner, kind))
        self._script = client.register_script(script("quota"))

    def _run(self, limit: int, entry: str, size: int, lapse_at: float, released: Iterable[str]) -> tuple[bool, int]:
        args: list[str | int] = [repr(time.time()), limit, entry, size, repr(lapse_at), *released]
        added, total = self._script(keys=self.keys, args=args)
        return bool(added), int(total)

    def reserve(
        self, entry: str, size: int, limit: int, lapse_at: float, released: Iterable[str] = ()
    ) -> tuple[bool, int]:
        """Count `size` bytes for `entry` until `lapse_at` unless the total would pass `limit` (after `released`
        and lapsed entries left): (whether it was counted, the total before it)."""
        return self._run(limit, entry, size, lapse_at, released)

    def release(self, *entries: str) -> int:
        """Stop counting these entries; the total left."""
        return self._run(0, "", 0, 0.0, entries)[1]

    def entries(self) -> list[str]:
        return [as_text(e) for e in self.r.zrange(self.keys[0], 0, -1)]
