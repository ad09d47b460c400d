"""The objects the OpenAI routes answer, as pydantic models for /openapi.json (built in objects.py,
responses.py, files.py and models.py), and the event streams some of them answer instead."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from web.openapi import ERROR_CODES, Batch, SubmitHeaders, doc

FINISH = Literal["stop", "length"]


class CachedTokens(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV the worker reused from its prefix cache")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    finish_reason: FINISH | None
    message: AssistantMessage
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    """A chat.completion; `id` is `chatcmpl-` + the job id's part after `job_` (header X-Job-Id: the job)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    service_tier: str | None
    choices: list[ChatChoice]
    usage: CompletionUsage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: FINISH | None
    logprobs: CompletionLogprobs | None


class TextCompletion(BaseModel):
    """A text_completion; `id` is `cmpl-` + the job id's part after `job_`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[TextChoice]
    usage: CompletionUsage


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: CachedTokens
    output_tokens_details: dict[str, int]


class ResponseError(BaseModel):
    code: str | None
    message: str | None


class ResponseObject(BaseModel):
    """A response; `id` is `resp_` + the job id's part after `job_` (the job is in /v1/jobs)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
    background: bool
    model: str | None
    error: ResponseError | None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, Any]
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: str | None
    temperature: float | None
    top_p: float | None
    text: dict[str, Any]
    tool_choice: str
    tools: list[Any]
    truncation: str
    usage: ResponseUsage | None
    user: str | None
    store: bool


class Revision(BaseModel):
    worker: str = Field(description="the worker process (host:pid)")
    path: str = Field(description="the weights' directory (or hub id)")
    reload: str | None = Field(description="the reload that rolled this worker to them; null: the configured weights")
    since: float = Field(description="when the worker loaded them (epoch seconds)")


class Model(BaseModel):
    id: str = Field(description="the name asked for (the model's id in the list)")
    object: Literal["model"]
    created: int
    owned_by: str
    default: bool = Field(description="the model a request without `model` gets")
    workers: int = Field(description="live workers serving it")
    ready: bool
    reason: str | None = Field(description="why it is not ready")
    task: Literal["generate", "embed"] = Field(description="generate: the text routes; embed: /v1/embeddings only")
    revisions: list[Revision] = Field(
        default_factory=list, description="the weights each live worker serves (they differ during a reload)"
    )


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class _Page(BaseModel):
    object: Literal["list"]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileObject(BaseModel):
    """An uploaded file, or a batch's output (`file-out-…`) or error (`file-err-…`) file."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: Literal["processed"]
    status_details: str | None


class FileList(_Page):
    data: list[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchList(_Page):
    data: list[Batch]


# The streams (`stream: true`), described as text: their events are in the route summaries.
CHUNKS = {
    "text/event-stream": {
        "type": "string",
        "description": "`data: <chunk JSON>` events (chat.completion.chunk or text_completion), then `data: [DONE]`",
    }
}
RESPONSE_EVENTS = {
    "text/event-stream": {
        "type": "string",
        "description": "`event: response.<kind>` events; `data` is the event as JSON with its sequence_number",
    }
}


def job_doc(answer: type[BaseModel], body: type[BaseModel], stream: dict[str, Any]) -> Any:
    """`doc` of a route that runs one job: its body and submit headers, its answer or its stream, and the
    job's own errors (500: it failed; 504: it did not finish within the hard time limit)."""
    errors = (*ERROR_CODES, 500, 504)
    return doc(model=answer, json=body, headers=SubmitHeaders, media=stream, errors=errors, tags=("openai",))
