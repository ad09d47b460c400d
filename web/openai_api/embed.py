"""OpenAI's embeddings bodies → embedding job requests, and finished jobs → OpenAI's embedding list (shared by
`POST /v1/embeddings` and `/v1/embeddings` batch lines).

An embedding job is a generation job that generates nothing (`embed: true`, `max_new_tokens` 0): the worker of
a model served with `task: embed` runs each input as a row of one batched forward and pools it
(worker/engine/pooling.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from qwen_deploy.config import Settings
from qwen_deploy.errors import BadRequest
from qwen_deploy.requests import GenerationRequest
from web.openai_api.translate import check_model, unsupported
from web.schemas import check_task, pick_model

EMBEDDINGS = "/v1/embeddings"
KEYS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
MAX_INPUTS = 2048  # inputs of one request (OpenAI's limit)
FORMATS = ("float", "base64")

Input = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class EmbeddingCreate(BaseModel):
    """Body of POST /v1/embeddings (OpenAI's)."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="a model served with task: embed (GET /v1/models)")
    input: Input = Field(
        description=f"a text, a list of texts, a list of token ids or a list of token-id lists (up to {MAX_INPUTS} "
        "inputs); an input longer than generation.max_prompt_tokens is a 400, never cut"
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (default), or base64 of the little-endian float32 values"
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="the vectors' first components (one of the model's models[].embed_dimensions)"
    )
    user: StrictStr | None = Field(None, description="accepted and not used")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _inputs(value: Any) -> list[str | list[int]]:
    """The inputs of `input`, each checked (400 naming `input` or `input.N`)."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(type(t) is int for t in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = list(value)
    else:
        raise BadRequest(
            "input must be a non-empty string, list of strings, list of token ids or list of token-id lists",
            code="invalid_type" if not isinstance(value, list) else "invalid_value",
            param="input",
        )
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"at most {MAX_INPUTS} inputs; got {len(items)}", code="invalid_value", param="input")
    kind = str if isinstance(items[0], str) else list
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 and items[0] is value else f"input.{i}"
        if kind is str and not isinstance(item, str) or kind is list and not isinstance(item, list):
            raise BadRequest(f"{where}: every input must be of one kind", code="invalid_type", param=where)
        if not item:
            raise BadRequest(f"{where} must not be empty", code="invalid_value", param=where)
        if isinstance(item, list) and not all(type(t) is int and t >= 0 for t in item):
            raise BadRequest(f"{where}: token ids are integers of at least 0", code="invalid_value", param=where)
    return items


def embedding_request(body: Any, settings: Settings) -> GenerationRequest:
    """The stored job request of an embeddings body (the route's and a batch line's)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_type")
    for key in body:
        if key not in KEYS:
            raise unsupported(key)
    check_model(body, settings)
    served = pick_model(body["model"], settings)
    if served.alias != body["model"] and body["model"] not in served.names:
        raise BadRequest("embeddings run on a model, not on an adapter", code="invalid_value", param="model")
    inputs = _inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in FORMATS:
        raise BadRequest("encoding_format must be float or base64", code="invalid_value", param="encoding_format")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest("user must be a string", code="invalid_type", param="user")
    # always a list of inputs: the worker answers one vector each, in order
    req = GenerationRequest(
        prompt=inputs,  # type: ignore[arg-type]  # texts and token-id lists mixed: fine for embeddings
        embed=True,
        max_new_tokens=0,
        encoding_format=encoding,
        model=served.alias,
    )
    check_task(served, req)
    dimensions = body.get("dimensions")
    if dimensions is not None:
        allowed = served.model.embed_dimensions
        if not allowed:
            raise unsupported("dimensions", f"is not supported by the model {served.alias!r}")
        if type(dimensions) is not int or dimensions not in allowed:
            raise BadRequest(
                f"dimensions must be one of {', '.join(map(str, allowed))} for the model {served.alias!r}",
                code="invalid_value",
                param="dimensions",
            )
        req.dimensions = dimensions
    return req


def embedding_list(job: dict[str, Any], model: str) -> dict[str, Any]:
    """A finished embedding job as OpenAI's list of embeddings (vectors as the request's encoding_format)."""
    output = job.get("output") or {}
    tokens = int((output.get("usage") or {}).get("prompt_tokens") or 0)
    data = [
        {"object": "embedding", "index": c["index"], "embedding": c.get("embedding")}
        for c in sorted(output.get("choices") or [], key=lambda c: int(c["index"]))
    ]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
