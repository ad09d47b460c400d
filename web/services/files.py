"""Uploaded files (batch input) kept in Redis with a size cap and a TTL, one owner's at a time."""

from __future__ import annotations

import re
import time
from typing import Any

import redis

from qwen_deploy.errors import QuotaExceeded
from qwen_deploy.job_records import as_text, mapping, new_id
from qwen_deploy.keys import FileKeys
from qwen_deploy.quotas import Quota
from web.auth import current_owner
from web.context import current_services

FILE_PREFIX = "file-"
FILE_RECORD_BYTES = 1024  # what a file counts against its owner's quota beside its content: many tiny files add up
FILE_ID = re.compile(r"file-[0-9a-f]{28}")  # new_id(FILE_PREFIX)


class FileStore:
    """A file is a hash (meta + content, `FileKeys.key`); the owner's index (`FileKeys.index_key`) holds ids by
    creation time."""

    def __init__(
        self, client: redis.Redis, prefix: str, ttl: int, owner: str = "anonymous", quota: int | None = None
    ) -> None:
        self.r, self.prefix, self.ttl, self.owner = client, prefix, ttl, owner
        self.quota = quota  # bytes the owner's files may hold together (None: no quota)

    def key(self, file_id: str) -> str:
        return FileKeys(self.prefix).key(file_id)

    def index(self) -> str:
        """The owner's file ids by creation time."""
        return FileKeys(self.prefix).index_key(self.owner)

    def create(self, filename: str, purpose: str, content: str) -> dict[str, Any]:
        file_id, now = new_id(FILE_PREFIX), time.time()
        meta = {
            "id": file_id,
            "filename": filename,
            "purpose": purpose,
            "created_at": str(int(now)),
            "bytes": str(len(content.encode())),
        }
        size = int(meta["bytes"]) + FILE_RECORD_BYTES
        if self.quota is not None:
            counted, used = self._quota().reserve(file_id, size, self.quota, now + self.ttl)
            if not counted:
                raise QuotaExceeded(
                    f"this key's files hold {used} bytes; with this one ({size}, its record included) they would "
                    f"pass the quota of {self.quota} bytes (files.max_bytes_per_key); delete some first",
                    param="file",
                )
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key(file_id), mapping=mapping({**meta, "owner": self.owner, "content": content}))
        pipe.expire(self.key(file_id), self.ttl)
        pipe.zadd(self.index(), {file_id: now})
        pipe.zremrangebyscore(self.index(), "-inf", now - self.ttl)
        pipe.expire(self.index(), self.ttl)
        try:
            pipe.execute()
        except redis.RedisError:
            self._quota().release(file_id)
            raise
        return file_object(meta, self.ttl)

    def meta(self, file_id: str) -> dict[str, str] | None:
        """The owner's file (None for another owner's, or an id of another shape: no key is built from it)."""
        if not FILE_ID.fullmatch(file_id):
            return None
        fields = ["id", "filename", "purpose", "created_at", "bytes", "owner"]
        values = dict(zip(fields, self.r.hmget(self.key(file_id), fields)))
        if not values["id"] or values.pop("owner") != self.owner:  # another key's file: not found
            return None
        return {k: as_text(v) for k, v in values.items()}

    def content(self, file_id: str) -> str | None:
        raw = self.r.hget(self.key(file_id), "content") if self.meta(file_id) else None
        return None if raw is None else as_text(raw)

    def delete(self, file_id: str) -> bool:
        if self.meta(file_id) is None:
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.key(file_id))
        pipe.zrem(self.index(), file_id)
        deleted = bool(pipe.execute()[0])
        self._quota().release(file_id)
        return deleted

    def _quota(self) -> Quota:
        return Quota(self.r, self.prefix, self.owner, "files")

    def ids(self) -> list[str]:
        """Newest first."""
        self.r.zremrangebyscore(self.index(), "-inf", time.time() - self.ttl)
        return [as_text(i) for i in self.r.zrevrange(self.index(), 0, -1)]


def file_object(meta: dict[str, Any], ttl: int | None = None) -> dict[str, Any]:
    created = int(meta["created_at"])
    return {
        "id": meta["id"],
        "object": "file",
        "bytes": int(meta["bytes"]),
        "created_at": created,
        "expires_at": created + ttl if ttl else None,
        "filename": meta["filename"],
        "purpose": meta["purpose"],
        "status": "processed",
        "status_details": None,
    }


def file_store() -> FileStore:
    """The caller's files."""
    svc = current_services()
    files = svc.settings.files
    return FileStore(svc.redis, svc.settings.key_prefix, files.ttl, current_owner(), files.max_bytes_per_key)
