"""Request bodies: parsed strictly with pydantic, turned into AppErrors with code and param."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from flask import Request, has_app_context
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonDict
from werkzeug.exceptions import ClientDisconnected

from qwen_deploy.adapters import find_adapter
from qwen_deploy.config import Settings
from qwen_deploy.errors import BadRequest, ModelNotFound, Unprocessable, UnsupportedMediaType
from qwen_deploy.requests import GenerationRequest
from qwen_deploy.runtime_models import find_runtime
from qwen_deploy.served import Served, find_model, served_models
from web.context import current_services
from web.response_format import ResponseFormat, check_response_format
from web.tools import ToolCall, ToolFields, check_tools

Number = StrictFloat | StrictInt
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
TOKEN_ID = re.compile(r"[0-9]{1,9}")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr | None = Field(None, description="required but for an assistant message with tool_calls")
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant message: the calls it made")
    tool_call_id: StrictStr | None = Field(None, description="a tool message: the call it answers")

    @model_validator(mode="after")
    def _content(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message, and only a tool message, has a tool_call_id")
        return self


# Exactly one of prompt / messages (documented as oneOf; enforced in parse_job).
_ONE_OF_PROMPT: JsonDict = {
    "oneOf": [
        {"required": ["prompt"]},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]
}
MAX_CHOICES = 64  # prompts x n of one request: the samples one job may hold
TokenIds = list[StrictInt]


class WebhookFields(BaseModel):
    """Optional webhook of a job: POSTed (signed, Standard Webhooks) on the chosen events."""

    webhook: StrictStr | None = Field(None, max_length=2048, description="http(s) URL called on the events")
    webhook_events_filter: list[Literal["start", "output", "completed"]] | None = Field(
        None, min_length=1, description='default ["completed"]'
    )


class LifecycleFields(BaseModel):
    """Optional priority and deadline of a job (see web/job_options.py); kept in the record."""

    priority: Literal["high", "normal", "low"] | None = Field(
        None, description="claim order among queued jobs: high, then normal (default), then low; FIFO within"
    )
    deadline_seconds: Number | None = Field(
        None,
        gt=0,
        le=86400,
        description="cancel the job this many seconds after submit (also the Cancel-After "
        "header; the earlier wins): queued → canceled, running → stopped with its "
        "partial text; error code deadline_exceeded",
    )


class JobCreate(WebhookFields, LifecycleFields, ToolFields):
    """Body of POST /v1/jobs and /v1/generate: a prompt or chat messages, and generation settings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_OF_PROMPT)
    model: StrictStr | None = Field(
        None, max_length=256, description="a model id from GET /v1/models; default: the first"
    )
    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds] | None = Field(
        None,
        description="a text, a list of token ids, or several prompts (a list of texts or of token-id lists: "
        "one choice per prompt and sample in output.choices, prompt-major); token ids must be in the model's "
        "vocabulary, and long prompts keep their last max_prompt_tokens tokens as texts do",
    )
    messages: list[Message] | None = Field(None, min_length=1)
    continue_final_message: StrictBool | None = Field(
        None, description="the last message is an assistant message the model continues (a prefill)"
    )
    max_new_tokens: StrictInt | None = Field(
        None,
        description="1 to the configured cap (512), or 0 with echo; default 64",
        json_schema_extra={"minimum": 0, "maximum": 512},
    )
    temperature: Number | None = Field(None, ge=0, le=2, description="0 or absent: greedy")
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: StrictStr | list[StrictStr] | None = Field(
        None,
        description="up to 4 strings of 1 to 64 characters",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": 64},
                {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1, "maxLength": 64}},
                {"type": "null"},
            ]
        },
    )
    repetition_penalty: Number | None = Field(None, gt=0, le=10)
    presence_penalty: Number | None = Field(
        None, ge=-2, le=2, description="OpenAI's: subtracted from the logit of every token generated so far"
    )
    frequency_penalty: Number | None = Field(
        None, ge=-2, le=2, description="OpenAI's: subtracted times the number of times a token was generated so far"
    )
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None = Field(
        None,
        max_length=MAX_LOGIT_BIAS,
        description=f"token id (a decimal string) → -100 to 100 added to its logit; at most {MAX_LOGIT_BIAS} ids",
    )
    min_p: Number | None = Field(
        None, ge=0, le=1, description="drop tokens less likely than min_p times the most likely one (after temperature)"
    )
    min_tokens: StrictInt | None = Field(
        None, ge=0, description="no EOS, stop token or stop string before this many tokens; at most max_new_tokens"
    )
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(
        None,
        max_length=MAX_STOP_TOKEN_IDS,
        description="token ids that end a sample (left out of its text); finish_reason stop",
    )
    ignore_eos: StrictBool | None = None
    n: StrictInt | None = Field(None, ge=1, le=8, description="samples per request (default 1)")
    logprobs: StrictBool | None = Field(None, description="return each sampled token's log probability")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=5, description="most likely alternatives per token; needs logprobs"
    )
    response_format: ResponseFormat | None = Field(
        None, description="structured output: text, json_object, or json_schema {name, schema, strict}"
    )
    echo: StrictBool | None = Field(
        None,
        description="each choice also carries its prompt: `echo` (the prompt's text) and, with logprobs, "
        "`prompt_logprobs` (each prompt token's log probability from the prefill's forward; the first is null); "
        "allows max_new_tokens 0 (score the prompt only)",
    )
    return_token_ids: StrictBool | None = Field(
        None, description="each choice also carries `prompt_token_ids` and the generated `token_ids`"
    )


class BatchLine(BaseModel):
    custom_id: StrictStr
    body: JobCreate


class BatchCreate(BaseModel):
    """JSON form of POST /v1/batches (the JSONL form sends OpenAI Batch lines instead).

    Each item should be a `BatchLine`; an item that is not becomes an error line of its own
    (the batch is still accepted), except a repeated `custom_id`, which rejects the batch.
    """

    requests: list[BatchLine | Any] = Field(min_length=1)
    metadata: dict[str, str] | None = Field(None, max_length=16, description="up to 16 keys (64 chars), values 512")
    webhook: StrictStr | None = Field(None, description="called with batch.completed (JSONL form: ?webhook=)")
    completion_window: StrictStr | None = Field(
        None,
        description="default 24h (the most); a shorter duration like 1h or 30s (JSONL form: "
        "?completion_window=). Lines not done by then end with error batch_expired and the batch "
        "ends expired",
    )


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})
_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}


COUNT = re.compile(r"[0-9]{1,12}")  # str.isdigit() takes "²" and "١", which int() refuses


def count_arg(raw: str, param: str, low: int, high: int) -> int:
    """A query count from `low` to `high` in ASCII digits, else 400 `invalid_value` naming `param`."""
    if not COUNT.fullmatch(raw) or not low <= int(raw) <= high:
        raise BadRequest(f"{param} must be an integer from {low} to {high}", code="invalid_value", param=param)
    return int(raw)


def read_json(request: Request) -> Any:
    """The request's JSON body: 415 for another content type, 400 when it does not parse."""
    if request.environ.get("CONTENT_TYPE") != "application/json" and request.mimetype != "application/json":
        raise UnsupportedMediaType(
            f"expected Content-Type application/json, got {request.mimetype or 'none'}",
            code="unsupported_media_type",
            param="Content-Type",
        )
    raw = _body(request)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def _body(request: Request) -> bytes:
    """The body, as `request.get_data(cache=False)` reads it; a declared length within the limit is read
    straight from the server's stream (werkzeug's stream wrapper costs more than the read: 7.8 us per submit
    in-process; kept by the end-to-end figure, see `web.jobs._JobResponse`)."""
    environ = request.environ
    length = environ.get("CONTENT_LENGTH", "")
    limit = request.max_content_length
    size = int(length) if 0 < len(length) < 10 and length.isascii() and length.isdigit() else -1
    if size < 0 or (limit is not None and size > limit):
        return request.get_data(cache=False)
    data = environ["wsgi.input"].read(size)
    if len(data) != size:
        raise ClientDisconnected()  # what werkzeug's stream raises for a body cut short
    return bytes(data)


def _is_type_tag(part: str | int) -> bool:
    """Union branches add their type names to loc ("stop", "list[str]", 0)."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def validation_error(exc: ValidationError) -> Unprocessable:
    err = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or None
    code = _CODES.get(err["type"], "invalid_type" if err["type"].endswith("_type") else "invalid_value")
    return Unprocessable(f"{param}: {err['msg']}" if param else err["msg"], code=code, param=param)


def pick_target(name: Any, settings: Settings) -> tuple[Served, str | None]:
    """The served model a request's `model` names (absent: the default; a configured model, else an adapter, else
    a model registered at runtime) and the LoRA adapter it names (None: the base); 404 model_not_found otherwise."""
    found = find_model(settings, name) if name is None or isinstance(name, str) else None
    if found is not None:
        return found, None
    if isinstance(name, str) and name:
        client = current_services().redis if has_app_context() else None
        base = find_adapter(client, settings, name)
        if base is not None:
            return base, name
        registered = find_runtime(client, settings, name)
        if registered is not None:
            return registered, None
    ids = ", ".join(repr(m.alias) for m in served_models(settings))
    raise ModelNotFound(f"the model {name!r} does not exist; this server serves {ids}", param="model")


def pick_model(name: Any, settings: Settings) -> Served:
    """The served model a request's `model` names (an adapter's: its base); 404 model_not_found otherwise."""
    return pick_target(name, settings)[0]


def check_task(served: Served, req: GenerationRequest) -> None:
    """400 `wrong_model_task` for an embedding request to a model that generates, or a request that generates
    (or scores a prompt) to a model served with `task: embed`; token counts are fine on either."""
    embed = served.model.task == "embed"
    if req.embed and not embed:
        raise BadRequest(
            f"the model {served.alias!r} generates text; embeddings need a model served with task: embed",
            code="wrong_model_task",
            param="model",
        )
    if embed and not req.embed and (req.max_new_tokens or req.logprobs):
        raise BadRequest(
            f"the model {served.alias!r} serves embeddings only (POST /v1/embeddings); it does not generate text",
            code="wrong_model_task",
            param="model",
        )


def public_id(name: Any, settings: Settings) -> str:
    """The id a request's `model` stands for: the base model's alias, or the adapter's name."""
    served, adapter = pick_target(name, settings)
    return adapter or served.alias


_NOT_STORED = {"model", "response_format", *WebhookFields.model_fields, *LifecycleFields.model_fields}


def prompt_list(prompt: Any) -> list[Any]:
    """The prompts of a `prompt` field: a text or a token-id list is one; a list of texts or of token-id lists is
    several."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _check_prompts(prompt: Any, n: int) -> None:
    if prompt is None:
        return
    if isinstance(prompt, list) and not prompt:
        raise Unprocessable("prompt must not be an empty list", code="invalid_value", param="prompt")
    prompts = prompt_list(prompt)
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 and p is prompt else f"prompt.{i}"
        if isinstance(p, list) and not p:
            raise Unprocessable(f"{where} must hold at least one token id", code="invalid_value", param=where)
        if isinstance(p, list) and min(p) < 0:
            raise Unprocessable(f"{where}: token ids are not negative", code="invalid_value", param=where)
    if len(prompts) * n > MAX_CHOICES:
        raise Unprocessable(
            f"{len(prompts)} prompts x n {n} is more than {MAX_CHOICES} choices in one request",
            code="too_many_choices",
            param="prompt",
        )


def parse_job(body: Any, settings: Settings) -> GenerationRequest:
    """Validate a job body against the schema and the configured caps; return the request to store, with
    `model` the chosen model's alias (a job record keeps it as a field of its own, a batch line in its body)."""
    if not isinstance(body, dict):
        raise Unprocessable("request body must be a JSON object", code="invalid_type")
    try:
        req = JobCreate.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    for i, msg in enumerate(req.messages or []):
        if msg.content is None and not msg.tool_calls:
            raise Unprocessable(
                f"messages.{i}.content: Field required (only an assistant message with tool_calls may omit it)",
                code="missing_field",
                param=f"messages.{i}.content",
            )
    gen = settings.generation
    if (req.prompt is None) == (req.messages is None):
        raise Unprocessable("give exactly one of prompt or messages", code="missing_prompt", param="prompt")
    n = gen.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    if n > gen.max_new_tokens_cap:
        raise Unprocessable(
            f"max_new_tokens is {n}; the maximum is {gen.max_new_tokens_cap}",
            code="max_new_tokens_too_large",
            param="max_new_tokens",
        )
    if n < (0 if req.echo else 1):
        raise Unprocessable(
            "max_new_tokens must be at least 1 (0 only with echo)", code="invalid_value", param="max_new_tokens"
        )
    _check_prompts(req.prompt, req.n or 1)
    if req.messages is not None and len(req.messages) > gen.max_messages:
        raise Unprocessable(f"at most {gen.max_messages} messages", code="too_many_messages", param="messages")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > gen.max_stop_strings:
        raise Unprocessable(f"at most {gen.max_stop_strings} stop strings", code="too_many_stop_strings", param="stop")
    if any(not s or len(s) > gen.max_stop_length for s in stop):
        raise Unprocessable(
            f"stop strings must be 1 to {gen.max_stop_length} characters", code="invalid_value", param="stop"
        )
    if req.continue_final_message and (req.messages is None or req.messages[-1].role != "assistant"):
        raise Unprocessable(
            "continue_final_message needs messages ending with an assistant message",
            code="invalid_value",
            param="continue_final_message",
        )
    if req.min_tokens is not None and req.min_tokens > n:
        raise Unprocessable(
            f"min_tokens is {req.min_tokens}; max_new_tokens is {n}", code="invalid_value", param="min_tokens"
        )
    bad = [k for k in req.logit_bias or {} if not TOKEN_ID.fullmatch(k)]
    if bad:
        raise Unprocessable(
            f"logit_bias keys must be token ids (decimal strings), got {bad[0]!r}",
            code="invalid_value",
            param="logit_bias",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise Unprocessable("top_logprobs needs logprobs: true", code="invalid_value", param="top_logprobs")
    # webhook and lifecycle fields are kept in the record, not in the request the worker reads
    data = req.model_dump(exclude_none=True, exclude=_NOT_STORED)
    if req.response_format is not None:
        check_response_format(req.response_format)
        data["response_format"] = body["response_format"]  # stored as given
    served, adapter = pick_target(req.model, settings)
    data.update(max_new_tokens=n, stop=stop, model=served.alias)
    if adapter is not None:
        data["adapter"] = adapter
    check_tools(data)
    return GenerationRequest(**data)  # a body field the stored request lacks is a TypeError here (a bug)
