"""`/v1/files`: batch input files kept in Redis (size cap, TTL), and the batches' virtual output files."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from flask import Blueprint, Response, jsonify, request

from qwen_deploy.batches import BATCH_ID_PREFIX, ERROR_FILE, OUTPUT_FILE, TERMINAL
from qwen_deploy.errors import BadRequest, PayloadTooLarge
from web.auth import current_owner
from web.context import current_services
from web.openai_api.batch_files import virtual_file
from web.openai_api.bodies import FileListQuery, FileUpload
from web.openai_api.shapes import FileDeleted, FileList, FileObject
from web.openapi import TEXT, doc
from web.schemas import count_arg
from web.services import FILE_PREFIX, batch_store, file_object, file_store, missing

bp = Blueprint("openai_files", __name__, url_prefix="/v1/files")

PURPOSES = frozenset({"batch"})
MULTIPART_SLACK = 64 * 1024  # form fields and part headers around the file


def page(ids: list[str], limit_arg: str | None, after: str | None, default: int = 20) -> tuple[list[str], bool]:
    """A page of `ids` after the cursor `after` (an id), at most `limit` of them; and whether more follow."""
    limit = count_arg(limit_arg if limit_arg is not None else str(default), "limit", 1, 10_000)
    start = 0
    if after:
        if after not in ids:
            raise BadRequest(f"after: no item with id {after}", code="invalid_value", param="after")
        start = ids.index(after) + 1
    chosen = ids[start : start + limit]
    return chosen, start + len(chosen) < len(ids)


def listing(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _batch_of(file_id: str) -> str:
    """The batch of a virtual file id (`file-out-<hex>`, `file-err-<hex>`) that `virtual_file` accepted."""
    return BATCH_ID_PREFIX + file_id.split("-", 2)[2]


class EndedBatchFiles:
    """The output and error files of ended batches, built once per process (they no longer change), the
    least recently read dropped past `limit` bytes of content; keyed by owner and file id."""

    def __init__(self, limit: int = 64 * 1024 * 1024) -> None:
        self.limit, self.size = limit, 0
        self.files: OrderedDict[tuple[str, str], tuple[dict[str, Any], str]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, file_id: str) -> tuple[dict[str, Any], str] | None:
        with self.lock:
            found = self.files.get((current_owner(), file_id))
            if found is not None:
                self.files.move_to_end((current_owner(), file_id))
        return found if found is not None and batch_store().status(_batch_of(file_id)) else None  # gone once expired

    def put(self, file_id: str, obj: dict[str, Any], content: str) -> None:
        if batch_store().status(_batch_of(file_id)) not in TERMINAL:
            return  # lines still arrive
        with self.lock:
            self.files[(current_owner(), file_id)] = (obj, content)
            self.size += len(content)
            while self.size > self.limit and self.files:
                self.size -= len(self.files.popitem(last=False)[1][1])


ENDED = EndedBatchFiles()


def resolve(file_id: str) -> tuple[dict[str, Any], Any]:
    """(file object, a function returning its content) for an uploaded or a batch output file."""
    cached = ENDED.get(file_id) if file_id.startswith((OUTPUT_FILE, ERROR_FILE)) else None
    if cached is not None:
        return cached[0], lambda: cached[1]
    virtual = virtual_file(file_id)  # 404 for another key's batch or an id of another shape
    if virtual is not None:
        obj, content = virtual[0], virtual[1]()
        ENDED.put(file_id, obj, content)
        return obj, lambda: content
    files = file_store()
    meta = files.meta(file_id)
    if meta is None:
        raise missing("file", file_id, FILE_PREFIX)
    return file_object(meta, files.ttl), lambda: files.content(file_id) or ""


@bp.post("")
@doc(model=FileObject, form=FileUpload, tags=("files",))
def upload() -> Response:
    """Upload a file (multipart `file`, `purpose=batch`)."""
    limit = current_services().settings.files.max_bytes
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
    return jsonify(file_store().create(upload.filename or "upload.jsonl", purpose, content))


@bp.get("")
@doc(model=FileList, query=FileListQuery, tags=("files",))
def list_files() -> Response:
    """Uploaded files, newest first (`purpose`, `limit`, `after`)."""
    files = file_store()
    purpose = request.args.get("purpose")
    metas = [m for m in (files.meta(i) for i in files.ids()) if m and (not purpose or m["purpose"] == purpose)]
    if request.args.get("order") == "asc":
        metas.reverse()
    by_id = {m["id"]: m for m in metas}
    chosen, more = page(list(by_id), request.args.get("limit"), request.args.get("after"), 10_000)
    return jsonify(listing([file_object(by_id[i], files.ttl) for i in chosen], more))


@bp.get("/<file_id>")
@doc(model=FileObject, tags=("files",))
def get_file(file_id: str) -> Response:
    """A file's metadata (an upload, or a batch's output or error file)."""
    return jsonify(resolve(file_id)[0])


@bp.get("/<file_id>/content")
@doc(media={"application/jsonl": TEXT, "application/octet-stream": TEXT}, tags=("files",))
def file_content(file_id: str) -> Response:
    """A file's content: JSONL for uploads and batch output and error files."""
    obj, content = resolve(file_id)
    return Response(
        content(), mimetype="application/jsonl" if obj["filename"].endswith(".jsonl") else "application/octet-stream"
    )


@bp.delete("/<file_id>")
@doc(model=FileDeleted, tags=("files",))
def delete_file(file_id: str) -> Response:
    """Delete an uploaded file."""
    if not file_store().delete(file_id):
        raise missing("file", file_id, FILE_PREFIX)
    return jsonify(id=file_id, object="file", deleted=True)
