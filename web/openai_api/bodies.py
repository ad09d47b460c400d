"""The OpenAI request bodies as pydantic models, for /openapi.json.

The routes read a body by hand (web/openai_api/translate.py: OpenAI's 400s naming the parameter), then
validate the job it becomes with `JobCreate`; so every parameter passed to the job is described here by
`JobCreate`'s own field (type and bounds), and each model's fields are exactly the keys its route accepts
(a unit test holds them equal).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, create_model

from web.openai_api.translate import PASSED, TOOL_KEYS
from web.schemas import JobCreate
from web.tools import FunctionDef, FunctionName

TIERS = Literal["auto", "default", "flex", "priority"]


def job_fields(*names: str, **renamed: str) -> dict[str, Any]:
    """`JobCreate` fields for create_model: `names` as they are, `renamed` as new name → job field."""
    pairs = [(name, name) for name in names] + list(renamed.items())
    fields = {}
    for name, source in pairs:
        info = JobCreate.model_fields[source]
        fields[name] = (info.annotation, copy.copy(info))
    return fields


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "input_text", "output_text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message; `developer` is taken as `system`, a list of text parts is joined."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    type: Literal["message"] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = Field(None, description="a last chunk with the usage and no choices")


class _Common(BaseModel):
    """Parameters of both chat and text completions (the sampling ones are the job's)."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="a model id from GET /v1/models")
    stream: StrictBool | None = Field(None, description="true: server-sent chunks, then `data: [DONE]`")
    stream_options: StreamOptions | None = Field(None, description="needs stream: true")
    service_tier: TIERS | None = Field(None, description="priority → high, default/auto → normal, flex → low")
    user: StrictStr | None = Field(None, description="accepted and ignored")


SAMPLING = (*PASSED, "response_format")  # the job fields both completion routes pass under their own names


class _ChatOwn(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class _CompletionOwn(_Common):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]] = Field(
        description="a string, token ids, or a list of either (one choice per prompt and sample, prompt-major)"
    )
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="log probabilities with k alternatives")
    echo: StrictBool | None = Field(
        None, description="the prompt before the text; with logprobs, the prompt's tokens scored (not with stream)"
    )
    best_of: StrictInt | None = Field(None, ge=1, description="accepted only equal to n (every sample is returned)")


ChatCompletionCreate = create_model(
    "ChatCompletionCreate",
    __base__=_ChatOwn,
    __doc__="Body of POST /v1/chat/completions (one job; `n` samples).",
    **job_fields(*SAMPLING, "logprobs", "top_logprobs", max_tokens="max_new_tokens"),
    **job_fields(max_completion_tokens="max_new_tokens"),
    **job_fields(*TOOL_KEYS),
)

CompletionCreate = create_model(
    "CompletionCreate",
    __base__=_CompletionOwn,
    __doc__="Body of POST /v1/completions (one job; `n` samples).",
    **job_fields(*SAMPLING, max_tokens="max_new_tokens"),
)


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat


class ResponseTool(FunctionDef):
    """A Responses function tool: the chat route's function, flat, with its type."""

    type: Literal["function"]


class ResponseToolChoice(FunctionName):
    type: Literal["function"]


class _ResponseOwn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(description="a model id from GET /v1/models")
    input: StrictStr | list[ChatMessage] = Field(description="a user message, or messages")
    instructions: StrictStr | None = Field(None, description="a system message before the input")
    background: StrictBool | None = Field(None, description="true: answer at once (status queued); poll or stream")
    stream: StrictBool | None = Field(None, description="true: `response.*` server-sent events")
    service_tier: TIERS | None = Field(None, description="priority → high, default/auto → normal, flex → low")
    metadata: dict[str, StrictStr] | None = Field(None, description="returned with the response")
    store: StrictBool | None = Field(None, description="accepted; responses are always kept (as jobs)")
    user: StrictStr | None = Field(None, description="accepted and ignored")
    text: TextOptions | None = Field(None, description='only {"format": {"type": "text"}}')
    tools: list[ResponseTool] | None = Field(None, max_length=64, description="function tools")
    tool_choice: Literal["none", "auto", "required"] | ResponseToolChoice | None = Field(
        None, description="as on the chat route: required or a named function is generated under a grammar"
    )
    parallel_tool_calls: StrictBool | None = Field(None, description="with required: one or more calls (default)")


ResponseCreate = create_model(
    "ResponseCreate",
    __base__=_ResponseOwn,
    __doc__="Body of POST /v1/responses (one job).",
    **job_fields("temperature", "top_p", "top_k", "seed", "ignore_eos", max_output_tokens="max_new_tokens"),
)


class ResponseQuery(BaseModel):
    stream: Literal["true", "false"] | None = Field(None, description="true: replay the response's events")
    starting_after: StrictInt | None = Field(
        None, ge=-1, le=10**12 - 1, description="with stream: the events after this sequence number"
    )


class ListQuery(BaseModel):
    limit: StrictInt | None = Field(None, ge=1, description="items per page (default 20)")
    after: StrictStr | None = Field(None, description="the id of the last item of the previous page")


class BatchListQuery(ListQuery):
    limit: StrictInt | None = Field(None, ge=1, le=100, description="batches per page, 1 to 100 (default 20)")


class FileListQuery(ListQuery):
    limit: StrictInt | None = Field(None, ge=1, le=10_000, description="files per page (default all)")
    purpose: StrictStr | None = Field(None, description="only files of this purpose")
    order: Literal["asc", "desc"] | None = Field(None, description="by creation time; default desc")


class FileUpload(BaseModel):
    """Multipart form of POST /v1/files."""

    purpose: Literal["batch"]
    file: bytes = Field(description="UTF-8 JSONL: one batch request per line", json_schema_extra={"format": "binary"})
