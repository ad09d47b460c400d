"""`/v1/files`: batch input files kept in Redis (size cap, TTL), and the batches' virtual output files."""

from __future__ import annotations

import time
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request

from qwen_deploy.errors import BadRequest, PayloadTooLarge
from qwen_deploy.jobs import new_id
from web import services
from web.auth import current_owner
from web.jobs import missing

bp = Blueprint("openai_files", __name__, url_prefix="/v1/files")

FILE_PREFIX = "file-"
PURPOSES = frozenset({"batch"})
MULTIPART_SLACK = 64 * 1024  # form fields and part headers around the file


class FileStore:
    """A file is a hash `{prefix}:file:{id}` (meta + content); `{prefix}:files` indexes ids by creation time."""

    def __init__(self, client: redis.Redis, prefix: str, ttl: int, owner: str = "anonymous") -> None:
        self.r, self.prefix, self.ttl, self.owner = client, prefix, ttl, owner

    def key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def index(self) -> str:
        """The owner's file ids by creation time."""
        return f"{self.prefix}:owner:{self.owner}:files"

    def create(self, filename: str, purpose: str, content: str) -> dict[str, Any]:
        file_id, now = new_id(FILE_PREFIX), time.time()
        meta = {"id": file_id, "filename": filename, "purpose": purpose, "created_at": str(int(now)),
                "bytes": str(len(content.encode()))}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key(file_id), mapping={**meta, "owner": self.owner, "content": content})
        pipe.expire(self.key(file_id), self.ttl)
        pipe.zadd(self.index(), {file_id: now})
        pipe.zremrangebyscore(self.index(), "-inf", now - self.ttl)
        pipe.expire(self.index(), self.ttl)
        pipe.execute()
        return file_object(meta, self.ttl)

    def meta(self, file_id: str) -> dict[str, str] | None:
        fields = ["id", "filename", "purpose", "created_at", "bytes", "owner"]
        values = dict(zip(fields, self.r.hmget(self.key(file_id), fields)))
        if not values["id"] or values.pop("owner") != self.owner:  # another key's file: not found
            return None
        return values

    def content(self, file_id: str) -> str | None:
        return self.r.hget(self.key(file_id), "content") if self.meta(file_id) else None

    def delete(self, file_id: str) -> bool:
        if self.meta(file_id) is None:
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.key(file_id))
        pipe.zrem(self.index(), file_id)
        return bool(pipe.execute()[0])

    def ids(self) -> list[str]:
        """Newest first."""
        self.r.zremrangebyscore(self.index(), "-inf", time.time() - self.ttl)
        return list(self.r.zrevrange(self.index(), 0, -1))


def store() -> FileStore:
    svc = services()
    return FileStore(svc.redis, svc.settings.key_prefix, svc.settings.files.ttl, current_owner())


def file_object(meta: dict[str, Any], ttl: int | None = None) -> dict[str, Any]:
    created = int(meta["created_at"])
    return {"id": meta["id"], "object": "file", "bytes": int(meta["bytes"]), "created_at": created,
            "expires_at": created + ttl if ttl else None, "filename": meta["filename"], "purpose": meta["purpose"],
            "status": "processed", "status_details": None}


def page(ids: list[str], limit_arg: str | None, after: str | None, default: int = 20) -> tuple[list[str], bool]:
    """A page of `ids` after the cursor `after` (an id), at most `limit` of them; and whether more follow."""
    raw = limit_arg if limit_arg is not None else str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise BadRequest("limit must be an integer from 1 to 10000", code="invalid_value", param="limit")
    start = 0
    if after:
        if after not in ids:
            raise BadRequest(f"after: no item with id {after}", code="invalid_value", param="after")
        start = ids.index(after) + 1
    chosen = ids[start:start + int(raw)]
    return chosen, start + len(chosen) < len(ids)


def listing(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def resolve(file_id: str) -> tuple[dict[str, Any], Any]:
    """(file object, a function returning its content) for an uploaded or a batch output file."""
    from web.openai_api.batches import virtual_file

    virtual = virtual_file(file_id)
    if virtual is not None:
        return virtual
    files = store()
    meta = files.meta(file_id)
    if meta is None:
        raise missing("file", file_id, FILE_PREFIX)
    return file_object(meta, files.ttl), lambda: files.content(file_id) or ""


@bp.post("")
def upload() -> Response:
    """Upload a file (multipart `file`, `purpose=batch`)."""
    limit = services().settings.files.max_bytes
    request.max_content_length = limit + MULTIPART_SLACK
    purpose = request.form.get("purpose")
    if purpose not in PURPOSES:
        raise BadRequest("purpose must be batch", code="invalid_value", param="purpose")
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("send the file as the multipart field `file`", code="missing_field", param="file")
    raw = upload.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"the file is larger than {limit} bytes", param="file")
    try:
        content = raw.decode()
    except UnicodeDecodeError:
        raise BadRequest("a batch file must be UTF-8 JSONL", code="invalid_file", param="file") from None
    return jsonify(store().create(upload.filename or "upload.jsonl", purpose, content))


@bp.get("")
def list_files() -> Response:
    """Uploaded files, newest first (`purpose`, `limit`, `after`)."""
    files = store()
    purpose = request.args.get("purpose")
    metas = [m for m in (files.meta(i) for i in files.ids()) if m and (not purpose or m["purpose"] == purpose)]
    if request.args.get("order") == "asc":
        metas.reverse()
    by_id = {m["id"]: m for m in metas}
    chosen, more = page(list(by_id), request.args.get("limit"), request.args.get("after"), 10_000)
    return jsonify(listing([file_object(by_id[i], files.ttl) for i in chosen], more))


@bp.get("/<file_id>")
def get_file(file_id: str) -> Response:
    return jsonify(resolve(file_id)[0])


@bp.get("/<file_id>/content")
def file_content(file_id: str) -> Response:
    obj, content = resolve(file_id)
    return Response(content(), mimetype="application/jsonl" if obj["filename"].endswith(".jsonl")
                    else "application/octet-stream")


@bp.delete("/<file_id>")
def delete_file(file_id: str) -> Response:
    if not store().delete(file_id):
        raise missing("file", file_id, FILE_PREFIX)
    return jsonify(id=file_id, object="file", deleted=True)
