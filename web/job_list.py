"""GET /v1/jobs: the caller's own jobs, newest first, paged with `after=<last_id>`.

Served from the owner's index (a sorted set written by the submit script), never a keyspace scan.
`status` and `type` filter the records read from the index; one page reads at most SCAN_MAX ids,
so a rare filter may answer fewer than `limit` jobs with `has_more: true` (pass `last_id` on).
"""

from __future__ import annotations

import json
from typing import Literal

from flask import Blueprint, Response, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen_deploy.job_records import public_job, valid_id
from qwen_deploy.lifecycle import with_positions
from web.auth import current_owner
from web.context import current_services
from web.openapi import Job, doc
from web.schemas import validation_error

bp = Blueprint("job_list", __name__, url_prefix="/v1")
SCAN_MAX = 2000


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["queued", "running", "succeeded", "failed", "canceled", "timed_out"] | None = None
    type: Literal["generation", "download", "export"] | None = None
    limit: int = Field(20, ge=1, le=100)
    after: str | None = Field(None, pattern=r"^job_[0-9a-f]{28}$", description="the last_id of the previous page")


class JobList(BaseModel):
    object: Literal["list"]
    data: list[Job]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


def _query() -> ListQuery:
    args = request.args.to_dict()
    if "limit" in args and not (args["limit"].isascii() and args["limit"].isdigit() and len(args["limit"]) <= 6):
        args["limit"] = "bad"  # "²", "1e3" and 10**30 are not page sizes
    try:
        return ListQuery.model_validate(args)
    except ValidationError as exc:
        raise validation_error(exc) from None


@bp.get("/jobs")
@doc(model=JobList, query=ListQuery, tags=("jobs",))
def list_jobs() -> Response:
    """The caller's jobs, newest first; `after` takes the `last_id` of the previous page."""
    q = _query()
    store, owner = current_services().store, current_owner()
    found: list[dict[str, object]] = []
    cursor, scanned, more = q.after, 0, False
    while len(found) <= q.limit and scanned < SCAN_MAX:
        chunk = 200 if q.status or q.type else q.limit + 1  # unfiltered: read only what the page needs
        ids = store.owned_ids(owner, cursor, min(chunk, SCAN_MAX - scanned))
        if not ids:
            break
        records = store.get_many(ids)
        gone = [job_id for job_id, rec in zip(ids, records) if rec is None]
        store.forget_owned(owner, gone)  # expired records: drop them from the index while we are here
        for job_id, record in zip(ids, records):
            scanned += 1
            cursor = job_id
            if record is None or not valid_id(job_id):
                continue
            job = public_job(record)
            if (q.status and job["status"] != q.status) or (q.type and job["type"] != q.type):
                continue
            if len(found) == q.limit:
                more = True
                break
            found.append(job)
        if more:
            break
    else:
        more = scanned >= SCAN_MAX
    if more and len(found) == q.limit:
        cursor = str(found[-1]["id"])
    found = with_positions(store, found)
    body = {
        "object": "list",
        "data": found,
        "first_id": found[0]["id"] if found else None,
        "last_id": cursor if more else (found[-1]["id"] if found else None),
        "has_more": more,
    }
    return Response(json.dumps(body), mimetype="application/json")
