"""The Anthropic routes in /openapi.json, written by hand: their errors have Anthropic's envelope (not the
project's `Error`), and a streamed message answers `text/event-stream`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from web.anthropic_api.objects import ERROR_TYPES

REF = "#/components/schemas/{model}"


class AnthropicTextBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = Field(None, description="accepted; changes no text")
    citations: Any = Field(None, description="accepted; changes no text")


class AnthropicToolUseBlock(BaseModel):
    """An assistant's call (in a request's history, or in the answer: `id` is `call_…`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AnthropicToolResultBlock(BaseModel):
    """A user message's result of an earlier tool_use (rendered through the model's chat template)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[AnthropicTextBlock] = ""
    is_error: bool | None = Field(None, description="the content is prefixed with `Error: `")
    cache_control: dict[str, Any] | None = None


class AnthropicThinkingBlock(BaseModel):
    """The model's reasoning (a chat template with a `<think>` block); `signature` is empty."""

    type: Literal["thinking"]
    thinking: str
    signature: str


class AnthropicMessageParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"] = Field(
        description="user first, then alternating; a final assistant message is a prefill the model continues"
    )
    content: str | list[AnthropicTextBlock | AnthropicToolUseBlock | AnthropicToolResultBlock]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["custom"] | None = Field(None, description="custom tools only (server tools: 400)")
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="a JSON Schema object (the structured-output subset)")
    cache_control: dict[str, Any] | None = None


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"] = Field(
        description="auto: the model's own call format is parsed; any / tool: a call is generated under a "
        "grammar of the input schemas, so its input always validates"
    )
    name: str | None = Field(None, description="with type tool")
    disable_parallel_tool_use: bool | None = None


class AnthropicCountTokensRequest(BaseModel):
    """Body of POST /v1/messages/count_tokens (the Messages body; `max_tokens` optional)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a model id from GET /v1/models")
    messages: list[AnthropicMessageParam] = Field(min_length=1)
    system: str | list[AnthropicTextBlock] | None = None
    max_tokens: int | None = Field(None, ge=1, le=512)
    stop_sequences: list[str] | None = Field(None, max_length=4)
    temperature: float | None = Field(None, ge=0, le=1, description="absent or 0: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = Field(None, description="accepted and ignored")
    stream: bool | None = None
    service_tier: Literal["auto", "standard_only"] | None = Field(None, description="accepted and ignored")
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None


class AnthropicMessageCreate(AnthropicCountTokensRequest):
    """Body of POST /v1/messages: text and tool blocks (`thinking`, image blocks: 400 naming them)."""

    max_tokens: int = Field(ge=1, le=512, description="new tokens, 1 to the configured cap (512)")


class AnthropicMessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class AnthropicMessage(BaseModel):
    """Anthropic's message; `id` is `msg_` + the job id's part after `job_` (the job is in /v1/jobs)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[AnthropicThinkingBlock | AnthropicTextBlock | AnthropicToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: AnthropicMessageUsage


class AnthropicTokenCount(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


MODELS = (
    AnthropicMessageCreate,
    AnthropicCountTokensRequest,
    AnthropicMessage,
    AnthropicTokenCount,
    AnthropicErrorResponse,
)
EVENTS = ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop"]
SSE = {  # one server-sent event of a streamed message; `data` is JSON whose `type` is the event name
    "type": "object",
    "properties": {
        "event": {"enum": [*EVENTS, "message_delta", "message_stop", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def schemas() -> dict[str, Any]:
    """The component schemas of these routes (nested models included)."""
    found: dict[str, Any] = {}
    for model in MODELS:
        schema = model.model_json_schema(ref_template=REF)
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def _operation(summary: str, op_id: str, body: type[BaseModel], ok: dict[str, Any]) -> dict[str, Any]:
    error = {"description": "error", "content": {"application/json": {"schema": _ref(AnthropicErrorResponse)}}}
    codes = sorted({str(code) for code, _ in ERROR_TYPES.values()} | {"500"})
    return {
        "post": {
            "summary": summary,
            "operationId": op_id,
            "tags": ["anthropic"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
            "responses": {"200": ok, **{code: error for code in codes}},
        }
    }


def paths() -> dict[str, Any]:
    message = {
        "description": "the message (`stream: true`: Anthropic's server-sent events)",
        "content": {"application/json": {"schema": _ref(AnthropicMessage)}, "text/event-stream": {"schema": SSE}},
    }
    count = {
        "description": "the prompt's tokens",
        "content": {"application/json": {"schema": _ref(AnthropicTokenCount)}},
    }
    return {
        "/v1/messages": _operation(
            "Anthropic's Messages API over one job (text; `stream: true` for its events).",
            "post_anthropic_messages",
            AnthropicMessageCreate,
            message,
        ),
        "/v1/messages/count_tokens": _operation(
            "Input tokens of a Messages body (the chat template applied), counted by the model's worker.",
            "post_anthropic_count_tokens",
            AnthropicCountTokensRequest,
            count,
        ),
    }
