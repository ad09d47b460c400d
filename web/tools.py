"""Job fields for function calling and chat-template options (`tools`, `tool_choice`, `parallel_tool_calls`,
`chat_template_kwargs`), and the checks pydantic cannot express. See qwen_deploy/tool_calls.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from qwen_deploy.errors import Unprocessable
from web.response_format import check_schema

NAME = r"^[A-Za-z0-9_.-]{1,64}$"
# Arguments of apply_chat_template that a request may not set through chat_template_kwargs.
RESERVED_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(pattern=NAME, description="a-z, A-Z, 0-9, _, . and -; at most 64")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of the arguments (an object)")
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class CallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    arguments: StrictStr = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr
    type: Literal["function"]
    function: CallFunction


class ToolFields(BaseModel):
    """Function calling (chat messages only): the functions the model may call and how it must choose."""

    tools: list[Tool] | None = Field(None, max_length=64, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="auto (default with tools): the model's own call format is parsed; required or a named "
        "function: a call is generated under a grammar of the functions' schemas; none: text only",
    )
    parallel_tool_calls: StrictBool | None = Field(None, description="with required: one or more calls (default)")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='extra variables for the chat template, e.g. {"enable_thinking": false}'
    )


def check_tools(data: dict[str, Any]) -> None:
    """The checks on the tool fields of a validated job (422 naming the parameter)."""
    tools = data.get("tools")
    choice = data.get("tool_choice")
    if data.get("messages") is None:
        for key in ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"):
            if data.get(key) is not None:
                raise Unprocessable(f"{key} needs messages (a chat), not a prompt", code="invalid_value", param=key)
    if choice is not None and choice != "none" and not tools:
        raise Unprocessable("tool_choice needs tools", code="invalid_value", param="tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise Unprocessable(f"two functions are named {name!r}", code="invalid_value", param=f"tools.{i}")
    for i, tool in enumerate(tools or []):
        schema = tool["function"].get("parameters")
        if schema is not None:
            if schema.get("type", "object") != "object":
                raise Unprocessable(
                    "parameters must be an object schema", code="invalid_value", param=f"tools.{i}.function.parameters"
                )
            check_schema(schema, f"tools.{i}.function.parameters")
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        raise Unprocessable(
            f"tool_choice names {choice['function']['name']!r}, which is not in tools",
            code="invalid_value",
            param="tool_choice.function.name",
        )
    if data.get("response_format") is not None and (choice == "required" or isinstance(choice, dict)):
        raise Unprocessable(
            "response_format cannot be combined with a forced tool call", code="invalid_value", param="response_format"
        )
    for key in data.get("chat_template_kwargs") or {}:
        if key in RESERVED_KWARGS:
            raise Unprocessable(
                f"{key} is set by the server", code="invalid_value", param=f"chat_template_kwargs.{key}"
            )
    ids = set()
    for i, msg in enumerate(data.get("messages") or []):
        for call in msg.get("tool_calls") or []:
            ids.add(call["id"])
        if msg["role"] == "tool" and msg.get("tool_call_id") not in ids:
            raise Unprocessable(
                "a tool message answers a call of an earlier assistant message (tool_call_id)",
                code="invalid_value",
                param=f"messages.{i}.tool_call_id",
            )
