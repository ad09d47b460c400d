"""Function calling and reasoning through the official SDKs on the shared stack (demo model): forced calls
under the grammar validate against the function's schema, streamed calls accumulate in the SDK's helper."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.unit.test_tool_calls import TIME, WEATHER

pytest.importorskip("worker.engine")
ASK = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def check_calls(calls: Any) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_call(oai: openai.OpenAI, model: str) -> None:
    done = oai.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    check_calls(calls)


def test_required_tool_calls_sampled(oai: openai.OpenAI, model: str) -> None:
    for parallel in (False, True):
        done = oai.chat.completions.create(
            model=model,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=parallel,
            temperature=1.0,
            seed=5,
            max_tokens=512,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
        assert parallel or len(choice.message.tool_calls) == 1


def test_streamed_tool_calls_accumulate_in_the_sdk_helper(oai: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = dict(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=1.0,
        seed=7,
        max_tokens=512,
    )
    with oai.chat.completions.stream(**kwargs) as stream:
        names = [e.name for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    check_calls(choice.message.tool_calls)
    assert names == [c.function.name for c in choice.message.tool_calls]
    whole = oai.chat.completions.create(**kwargs).choices[0].message.tool_calls  # seeded: the same calls
    assert [(c.function.name, c.function.arguments) for c in whole] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_tool_result_round_trip(oai: openai.OpenAI, model: str) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
    }
    history: list[Any] = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    done = oai.chat.completions.create(
        model=model,
        messages=[*history, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=4,
    )
    assert done.choices[0].finish_reason in ("stop", "length") and done.choices[0].message.tool_calls is None
    assert done.usage.prompt_tokens > 100  # the functions' description and the exchange are in the prompt
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=model,
            messages=[*history, {"role": "tool", "tool_call_id": "call_2", "content": "x"}],
            tools=[WEATHER],
        )
    assert err.value.param == "messages.2.tool_call_id"


def test_tool_errors_name_the_param(oai: openai.OpenAI, model: str) -> None:
    bad = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}},
        },
    }
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=ASK, tools=[bad])
    assert err.value.param == "tools.0.function.parameters.properties.a.pattern"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=ASK, tool_choice="required")
    assert err.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=model, messages=ASK, tools=[TIME], tool_choice="required", response_format={"type": "json_object"}
        )
    assert err.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=ASK, extra_body={"chat_template_kwargs": {"tools": []}})
    assert err.value.param == "chat_template_kwargs.tools"


def test_jobs_take_tools(client: Any) -> None:
    """POST /v1/jobs takes the same fields; the calls are in `output.choices[0].tool_calls`."""
    job = client.generate(
        messages=ASK,
        tools=[TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_new_tokens=64,
    )
    choice = job["output"]["choices"][0]
    assert job["status"] == "succeeded" and choice["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["tool_calls"]] == [("get_time", "{}")]


def test_auto_parses_the_models_own_call(oai: openai.OpenAI, model: str) -> None:
    """`auto` reads a call the model writes in its own format: here the demo model is made to write Llama
    3's JSON call by a response_format; whole and streamed, it comes back as a call, not as content."""
    llama_call = {
        "type": "object",
        "properties": {"name": {"const": "get_time"}, "parameters": TIME["function"]["parameters"]},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    kwargs: dict[str, Any] = dict(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": llama_call}},
        max_tokens=64,
    )
    choice = oai.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [("get_time", "{}")]
    with oai.chat.completions.stream(**kwargs) as stream:
        contents = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion().choices[0]
    assert "".join(contents) == "" and [c.function.name for c in final.message.tool_calls] == ["get_time"]
    plain = oai.chat.completions.create(model=model, messages=ASK, tools=[TIME], max_tokens=4).choices[0]
    assert plain.finish_reason == "length" and plain.message.content and plain.message.tool_calls is None
