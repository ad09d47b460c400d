"""`POST /v1/embeddings` (OpenAI's): one job of the queue per request, run by the worker of a model served with
`task: embed`, awaited like a non-streamed completion."""

from __future__ import annotations

import json

from flask import Blueprint, Response, g, request

from qwen_deploy.errors import BadRequest, GatewayTimeout
from web.context import current_services
from web.openai_api.completions import NO_RETRY, finished
from web.openai_api.embed import EmbeddingCreate, EmbeddingList, embedding_list, embedding_request
from web.openai_api.objects import job_headers
from web.openapi import doc
from web.schemas import read_json
from web.services import submit_request

bp = Blueprint("openai_embeddings", __name__)
bp.after_request(job_headers)


@bp.post("/v1/embeddings")
@doc(model=EmbeddingList, json=EmbeddingCreate, tags=("embeddings",))
def embeddings() -> Response:
    """Vectors of texts or token ids from a model served with `task: embed` (pooling from the model's
    sentence-transformers config, else last token; L2-normalized); another model's is a 400 `wrong_model_task`."""
    body = read_json(request)
    req = embedding_request(body, current_services().settings)
    model = body["model"]
    submitted, _ = submit_request(req, request.headers.get("Idempotency-Key"))
    g.openai_job_id = submitted["id"]
    try:
        job = finished(submitted["id"])
    except BadRequest as err:  # an input the worker refused (too long, a token id outside the vocabulary)
        if err.param and err.param.startswith("prompt"):
            err.param = "input"
        raise
    if job["status"] != "succeeded":
        raise GatewayTimeout(
            f"the embedding job {job['id']} ended {job['status']}", code="embedding_incomplete", headers=NO_RETRY
        )
    return Response(json.dumps(embedding_list(job, model)), mimetype="application/json")
