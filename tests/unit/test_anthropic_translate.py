"""Anthropic Messages bodies → job requests, and jobs → Anthropic's message, stop reasons and error envelope."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_deploy.config import Settings, load_settings
from qwen_deploy.errors import AppError
from qwen_deploy.served import served_models
from web.anthropic_api.objects import envelope, message, message_id, stop_reason
from web.anthropic_api.translate import message_request

ASK = [{"role": "user", "content": "Errors should never"}]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(environ={})


def body(settings: Settings, **fields: Any) -> dict[str, Any]:
    return {"model": served_models(settings)[0].alias, "max_tokens": 8, "messages": ASK, **fields}


def rejected(settings: Settings, raw: Any, counting: bool = False) -> AppError:
    with pytest.raises(AppError) as err:
        message_request(raw, settings, counting=counting)
    assert err.value.status_code == 400
    return err.value


def test_text_system_prefill_and_sampling(settings: Settings) -> None:
    blocks = [
        {"type": "text", "text": "Be "},
        {"type": "text", "text": "brief.", "cache_control": {"type": "ephemeral"}},
    ]
    req = message_request(
        body(
            settings,
            system=blocks,
            messages=[*ASK, {"role": "assistant", "content": "pass"}],
            stop_sequences=["\n"],
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            metadata={"user_id": "u-1"},
        ),
        settings,
    )
    assert req.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Errors should never"},
        {"role": "assistant", "content": "pass"},
    ]
    assert req.continue_final_message is True and req.stop == ["\n"] and req.max_new_tokens == 8
    assert (req.temperature, req.top_p, req.top_k) == (0.5, 0.9, 5)
    plain = message_request(body(settings, system="", messages=[*ASK, {"role": "assistant", "content": ""}]), settings)
    assert plain.messages == ASK and "continue_final_message" not in plain.stored()  # empty prefill and system dropped


def test_count_tokens_generates_nothing(settings: Settings) -> None:
    raw = body(settings)
    del raw["max_tokens"]
    assert message_request(raw, settings, counting=True).max_new_tokens == 0
    assert rejected(settings, raw).param == "max_tokens"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        (
            {
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "tool", "name": "g"},
            },
            "tool_choice.name",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        (
            {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"format": "x"}}}}]},
            "tools.0.input_schema.properties.a.format",
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"max_tokens": 513}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages.0.role"),
        ({"messages": [*ASK, *ASK]}, "messages.1.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0.type"),
        ({"messages": [*ASK, {"role": "assistant", "content": "pass "}]}, "messages.1.content"),
        ({"system": [{"type": "document", "source": {}}]}, "system.0.type"),
        ({"messages": []}, "messages"),
        ({"model": None}, "model"),
    ],
)
def test_rejected_naming_the_parameter(settings: Settings, fields: dict[str, Any], param: str) -> None:
    err = rejected(settings, body(settings, **fields))
    assert err.param == param and param in err.message


def test_message_and_stop_reasons() -> None:
    job = {
        "id": "job_abc",
        "output": {"text": "pass ", "finish_reason": "stop", "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
    }
    msg = message(job, "demo", ["silently"])
    assert msg["id"] == message_id("job_abc") == "msg_abc"
    assert msg["content"] == [{"type": "text", "text": "pass "}]
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "silently")
    assert msg["usage"]["input_tokens"] == 9 and msg["usage"]["output_tokens"] == 2
    for reason, expected in [
        ("eos", "end_turn"),
        ("length", "max_tokens"),
        ("time_limit", "max_tokens"),
        (None, "max_tokens"),
    ]:
        assert stop_reason({"output": {"finish_reason": reason}}, []) == (expected, None)


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, 400, "invalid_request_error"),
        (415, 400, "invalid_request_error"),
        (422, 400, "invalid_request_error"),
        (401, 401, "authentication_error"),
        (404, 404, "not_found_error"),
        (413, 413, "request_too_large"),
        (429, 429, "rate_limit_error"),
        (500, 500, "api_error"),
        (503, 529, "overloaded_error"),
    ],
)
def test_error_envelope(status: int, code: int, kind: str) -> None:
    raw = {"error": {"type": "x", "code": "c", "message": "is wrong", "param": "max_tokens"}}
    assert envelope(status, raw) == (
        code,
        {"type": "error", "error": {"type": kind, "message": "max_tokens: is wrong"}},
    )
    assert envelope(status, {"type": "error", "error": {}}) is None  # already Anthropic's


def test_tool_blocks_become_tool_messages(settings: Settings) -> None:
    tools = [{"name": "get_time", "description": "now", "input_schema": {"type": "object"}}]
    req = message_request(
        body(
            settings,
            tools=tools,
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            messages=[
                *ASK,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"tz": "UTC"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "noon"}],
                        },
                        {"type": "text", "text": "And now?"},
                    ],
                },
            ],
        ),
        settings,
    )
    assert req.tools == [
        {"type": "function", "function": {"name": "get_time", "description": "now", "parameters": {"type": "object"}}}
    ]
    assert (req.tool_choice, req.parallel_tool_calls) == ("required", False)
    assert (req.messages or [])[1:] == [
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
            ],
        },
        {"role": "tool", "content": "noon", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "And now?"},
    ]
    assert "continue_final_message" not in req.stored()


def test_tool_use_and_thinking_blocks() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    job = {
        "id": "job_abc",
        "output": {
            "text": "raw",
            "finish_reason": "stop",
            "choices": [{"index": 0, "text": "raw", "content": None, "reasoning_content": "hm", "tool_calls": [call]}],
        },
    }
    msg = message(job, "demo", [])
    assert msg["content"] == [
        {"type": "thinking", "thinking": "hm", "signature": ""},
        {"type": "tool_use", "id": "call_1", "name": "get_time", "input": {"tz": "UTC"}},
    ]
    assert msg["stop_reason"] == "tool_use"
    job["output"]["finish_reason"] = "length"
    assert message(job, "demo", [])["stop_reason"] == "max_tokens"
