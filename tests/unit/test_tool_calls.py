"""Tool calls and reasoning: the forced-call schema, the parsers and the stream split (no model; the worker's
rendering and forced calls are in test_handler.py)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from qwen_deploy import tool_calls as tc

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
# Qwen2.5's way of writing tools, calls and results (abridged from its chat template).
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for tool_call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}'
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3's thinking switch (abridged): enable_thinking=false writes an empty block into the prompt.
THINK_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def test_forced_schema_named_required_and_parallel() -> None:
    named = tc.forced_schema(
        {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    )
    assert named is not None and named["properties"]["name"] == {"const": "get_time"}
    jsonschema.validate({"name": "get_time", "arguments": {}}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {}}, named)
    parallel = tc.forced_schema({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert parallel is not None and parallel["type"] == "array" and parallel["minItems"] == 1
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}], parallel)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}], parallel)
    single = tc.forced_schema({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False})
    assert single is not None and single["properties"]["name"] == {"const": "get_weather"}
    assert tc.forced_schema({"tools": [WEATHER], "tool_choice": "auto"}) is None
    assert tc.forced_schema({"tools": [WEATHER], "tool_choice": "none"}) is None


def test_parse_forced() -> None:
    calls = tc.parse_forced(
        '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, {"name": "get_time", "arguments": {}}]'
    )
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert tc.parse_forced('{"name": "get_time", "arguments": {}}')[0]["function"]["arguments"] == "{}"
    assert tc.parse_forced('[{"name": "get_weather", "argu') == []  # cut short by max_tokens


def test_parse_auto_qwen_blocks() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    content, calls = tc.parse_auto(text, ["get_weather", "get_time"])
    assert content == "Let me check.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 1}),
        ("get_time", {}),
    ]
    assert tc.parse_auto('<tool_call>{"name": "get_time", "arguments": {}}', ["get_time"])[1]  # EOS before the close
    content, calls = tc.parse_auto("<tool_call>not json</tool_call> done", ["get_time"])
    assert calls == [] and content == "<tool_call>not json</tool_call> done"
    assert tc.parse_auto("It is sunny.", ["get_time"]) == ("It is sunny.", [])


def test_parse_auto_llama_json() -> None:
    content, calls = tc.parse_auto(
        ' {"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', ["get_weather"]
    )
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    # JSON that names no given function is content
    assert tc.parse_auto('{"name": "other", "parameters": {}}', ["get_weather"]) == (
        '{"name": "other", "parameters": {}}',
        [],
    )
    assert tc.parse_auto('{"answer": 4}', ["get_weather"]) == ('{"answer": 4}', [])


def test_split_reasoning() -> None:
    assert tc.split_reasoning("<think>\nLet me add.\n</think>\n\n4") == ("Let me add.", "4")
    assert tc.split_reasoning("Let me add.\n</think>\n\n4", opened=True) == ("Let me add.", "4")
    assert tc.split_reasoning("Let me add.\n</think>\n\n4") == ("Let me add.", "4")  # the prompt opened it
    assert tc.split_reasoning("<think>\nstill think") == ("still think", "")  # cut short
    assert tc.split_reasoning("4") == (None, "4")
    assert tc.split_reasoning("still", opened=True) == ("still", "")


def test_visible_streams_only_what_cannot_change() -> None:
    text = "<think>\nHmm, 2+2.\n</think>\n\nIt is 4. <tool_call>\n{}"
    seen = [tc.visible(text[:k], "auto") for k in range(len(text) + 1)]
    for (r0, c0), (r1, c1) in zip(seen, seen[1:]):
        assert r1.startswith(r0) and c1.startswith(c0)  # deltas only ever append
    assert seen[-1] == ("Hmm, 2+2.", "It is 4. ")
    assert tc.visible("<think>\nHmm </thi", "none") == ("Hmm ", "")
    assert tc.visible("plain text <tool_c", "auto") == ("", "plain text ")
    assert tc.visible('{"name": "get_time"', "auto") == ("", "")  # maybe Llama's JSON call
    assert tc.visible('[{"name": "get_time"', "required") == ("", "")
    assert tc.visible("plain text <tool_c", "none") == ("", "plain text <tool_c")
    assert tc.parse_sample(text, {}, True)["reasoning_content"] == seen[-1][0]


def test_parse_sample_modes() -> None:
    forced = tc.parse_sample(
        '{"name": "get_time", "arguments": {}}',
        {"tools": [TIME], "tool_choice": "required", "parallel_tool_calls": False},
        False,
    )
    assert forced["content"] is None and forced["tool_calls"][0]["function"]["name"] == "get_time"
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert len(tc.parse_sample(two, {"tools": [TIME]}, False)["tool_calls"]) == 2
    assert len(tc.parse_sample(two, {"tools": [TIME], "parallel_tool_calls": False}, False)["tool_calls"]) == 1
    none = tc.parse_sample("<tool_call>{}</tool_call>", {"tools": [TIME], "tool_choice": "none"}, False)
    assert none == {"content": "<tool_call>{}</tool_call>"}
    both = tc.parse_sample(
        '<think>x</think>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', {"tools": [TIME]}, True
    )
    assert both["reasoning_content"] == "x" and both["content"] is None and len(both["tool_calls"]) == 1


def test_stream_split_accumulates_to_the_final_choice() -> None:
    """What the chat stream sends (reasoning and content deltas as tokens come, then the rest and the calls
    from the finished choice) joins to the non-streamed message."""
    from web.openai_api.completions import ChatSplit

    text = '<think>\nWeather needs a tool.\n</think>\n\nChecking. <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    request = {"tools": [TIME], "tool_choice": "auto"}
    split = ChatSplit(1, tc.mode(request))
    sent: list[dict[str, Any]] = []
    for k in range(1, len(text) + 1, 3):
        sent += split.deltas(0, text[:k])
    final = {"index": 0, "text": text, **tc.parse_sample(text, request, True)}
    sent += split.final(final)
    joined = {key: "".join(d.get(key, "") for d in sent) for key in ("reasoning_content", "content")}
    assert (
        joined
        == {"reasoning_content": "Weather needs a tool.", "content": "Checking. "}
        == {
            "reasoning_content": final["reasoning_content"],
            "content": final["content"],
        }
    )
    calls = [d["tool_calls"][0] for d in sent if "tool_calls" in d]
    assert calls[0]["id"] == final["tool_calls"][0]["id"] and calls[0]["function"] == {
        "name": "get_time",
        "arguments": "",
    }
    assert calls[1] == {"index": 0, "function": {"arguments": "{}"}}


F = {"type": "function", "function": {"name": "f"}}
USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
        ({"prompt": "x", "tools": [F]}, "tools"),
        ({"messages": USER, "tools": [F, F]}, "tools.1"),
        (
            {
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            },
            "tools.0.function.parameters",
        ),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
        ({"messages": USER, "tool_choice": "auto"}, "tool_choice"),
        (
            {"messages": USER, "chat_template_kwargs": {"add_generation_prompt": False}},
            "chat_template_kwargs.add_generation_prompt",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "assistant"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
    ],
)
def test_job_tool_fields_are_checked(body: dict[str, Any], param: str) -> None:
    from qwen_deploy.config import load_settings
    from qwen_deploy.errors import AppError
    from web.schemas import parse_job

    with pytest.raises(AppError) as err:
        parse_job(body, load_settings(environ={}))
    assert err.value.status_code == 422 and err.value.param == param


def test_job_keeps_a_tool_exchange() -> None:
    from qwen_deploy.config import load_settings
    from web.schemas import parse_job

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        *USER,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    req = parse_job(
        {"messages": messages, "tools": [F], "tool_choice": "none", "chat_template_kwargs": {"x": 1}},
        load_settings(environ={}),
    )
    assert req.messages == messages and req.tools == [F] and req.tool_choice == "none"
    assert req.chat_template_kwargs == {"x": 1}
