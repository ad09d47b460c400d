"""`POST /tokenize` and `POST /detokenize` in vLLM's shapes (also under `/v1`). The tokenizer lives with the model
in the worker, so each is a job that generates nothing (max_new_tokens 0): the worker encodes the prompt (the chat
template for messages) or decodes the ids, as it would for a generation."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, request
from pydantic import BaseModel, ConfigDict, Field

from qwen_deploy.errors import BadRequest
from web.context import current_services
from web.openai_api.completions import finished
from web.openai_api.objects import choices, job_headers
from web.openai_api.translate import messages, unsupported, validated
from web.openapi import doc
from web.schemas import read_json
from web.services import submit_request

bp = Blueprint("openai_tokenize", __name__)
bp.after_request(job_headers)

# Accepted with the value the job already uses (vLLM's defaults): a prompt gets the tokenizer's special tokens,
# messages the chat template with the generation prompt.
DEFAULTS = {"add_special_tokens": None, "add_generation_prompt": True}


class TokenizeRequest(BaseModel):
    """Body of POST /tokenize: a prompt, or chat messages (rendered with the model's chat template)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="a model id from GET /v1/models; default: the first")
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None, description="the tokenizer's own choice (a prompt: true; messages: false); only that value"
    )
    add_generation_prompt: bool | None = Field(None, description="messages: true (the default) only")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="the most prompt tokens a job keeps (a longer prompt keeps its last ones)")


class DetokenizeRequest(BaseModel):
    """Body of POST /detokenize."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(min_length=1, description="token ids in the model's vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the ids' text (special tokens included)")


def _body(allowed: set[str]) -> dict[str, Any]:
    body = read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_type")
    for key in body:
        if key not in allowed:
            raise unsupported(key)
    return body


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """The finished job's only choice, for a request that generates nothing."""
    settings = current_services().settings
    req = validated(job, {}, settings)
    req.max_new_tokens = 0
    submitted, _ = submit_request(req, request.headers.get("Idempotency-Key"))
    g.openai_job_id = submitted["id"]
    return choices(finished(submitted["id"]))[0]


def _json(data: dict[str, Any]) -> Response:
    return Response(json.dumps(data), mimetype="application/json")


@bp.post("/tokenize")
@bp.post("/v1/tokenize")
@doc(model=TokenizeResponse, json=TokenizeRequest, tags=("tokens",))
def tokenize() -> Response:
    """The token ids of a prompt, or of chat messages under the model's chat template (vLLM's shape)."""
    body = _body({"model", "prompt", "messages", *DEFAULTS})
    for key, neutral in DEFAULTS.items():
        if body.get(key) is not None and body[key] != neutral:
            raise unsupported(key, f"is supported only as {neutral!r}" if neutral is not None else "is not supported")
    if ("prompt" in body) == ("messages" in body):
        raise BadRequest("give exactly one of prompt or messages", code="missing_prompt", param="prompt")
    job: dict[str, Any] = {"return_token_ids": True}
    if body.get("model") is not None:
        job["model"] = body["model"]
    if "messages" in body:
        job["messages"] = messages(body["messages"])
    else:
        if not isinstance(body["prompt"], str):
            raise BadRequest("prompt must be a string", code="invalid_type", param="prompt")
        job["prompt"] = body["prompt"]
    tokens = _run(job)["prompt_token_ids"]
    limit = current_services().settings.generation.max_prompt_tokens
    return _json({"tokens": tokens, "count": len(tokens), "max_model_len": limit})


@bp.post("/detokenize")
@bp.post("/v1/detokenize")
@doc(model=DetokenizeResponse, json=DetokenizeRequest, tags=("tokens",))
def detokenize() -> Response:
    """The text of token ids (vLLM's shape); ids outside the model's vocabulary are a 400 naming `tokens`."""
    body = _body({"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(type(t) is int for t in tokens):
        raise BadRequest("tokens must be a non-empty list of token ids", code="invalid_type", param="tokens")
    limit = current_services().settings.generation.max_prompt_tokens
    if len(tokens) > limit:
        raise BadRequest(f"at most {limit} tokens (max_prompt_tokens)", code="invalid_value", param="tokens")
    job: dict[str, Any] = {"prompt": tokens, "echo": True}
    if body.get("model") is not None:
        job["model"] = body["model"]
    try:
        choice = _run(job)
    except BadRequest as err:
        if err.param and err.param.startswith("prompt"):
            err.param = "tokens" + err.param[len("prompt") :]
            err.message = err.message.replace("prompt token id", "token id", 1).replace("prompt", "tokens", 1)
        raise
    return _json({"prompt": choice["echo"]})
