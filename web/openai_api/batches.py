"""`GET /v1/batches`: OpenAI's batch listing (the other batch routes are in web/batches.py)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from qwen_deploy.batches import public_batch
from qwen_deploy.errors import BadRequest
from web.auth import current_owner
from web.openai_api.bodies import BatchListQuery
from web.openai_api.shapes import BatchList
from web.openapi import doc
from web.schemas import count_arg
from web.services.stores import batch_store

bp = Blueprint("openai_batches", __name__, url_prefix="/v1/batches")


@bp.get("")
@doc(model=BatchList, query=BatchListQuery, tags=("batches",))
def list_batches() -> Response:
    """Batches, newest first: `limit` (1–100, default 20) and `after` (a batch id)."""
    limit = count_arg(request.args.get("limit", "20"), "limit", 1, 100)
    store = batch_store()
    found = store.page(current_owner(), request.args.get("after"), limit)
    if found is None:
        raise BadRequest(f"after: no batch with id {request.args.get('after')}", code="invalid_value", param="after")
    ids, more = found
    data = [public_batch(r) for r in (store.get(i) for i in ids) if r]
    return jsonify(
        object="list",
        data=data,
        has_more=more,
        first_id=data[0]["id"] if data else None,
        last_id=data[-1]["id"] if data else None,
    )
