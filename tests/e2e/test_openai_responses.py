"""The Responses API with the official `openai` SDK: background jobs, polling, cancel, resumable streams."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from qwen_deploy.job_records import new_job_id
from tests.helpers import Stack, wait_until
from tests.unit.test_tool_calls import WEATHER as CHAT_WEATHER

TERMINAL = ("completed", "failed", "cancelled", "incomplete")


def poll(oai: openai.OpenAI, response_id: str) -> openai.types.responses.Response:
    return wait_until(
        lambda: (r := oai.responses.retrieve(response_id)).status in TERMINAL and r, 30, 0.05, "a finished response"
    )


def test_background_poll_and_cancel(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    created = oai.responses.create(model=model, input="Errors should never", background=True, max_output_tokens=16)
    assert created.id.startswith("resp_") and created.status in ("queued", "in_progress")
    assert created.object == "response" and created.background is True
    done = poll(oai, created.id)
    assert done.status == "completed" and done.output_text.startswith("pass silently.")
    message = done.output[0]
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = done.usage
    assert usage.output_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    job = requests.get(f"{stack.url}/v1/jobs/job_{created.id.removeprefix('resp_')}", timeout=10).json()
    assert job["status"] == "succeeded" and job["output"]["text"] == done.output_text
    assert oai.responses.cancel(created.id).status == "completed"  # idempotent on a finished response

    long = oai.responses.create(
        model=model,
        input="Beautiful is better than",
        background=True,
        max_output_tokens=512,
        extra_body={"ignore_eos": True},
    )
    wait_until(lambda: oai.responses.retrieve(long.id).status == "in_progress", 30, 0.02, "a running response")
    cancelled = oai.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert poll(oai, long.id).status == "cancelled"
    assert oai.responses.cancel(long.id).status == "cancelled"


def test_streams_resume_after_a_sequence_number(oai: openai.OpenAI, model: str) -> None:
    events = list(
        oai.responses.create(model=model, input="Beautiful is better than", stream=True, max_output_tokens=24)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text and text.startswith("ugly.")
    resumed = list(oai.responses.retrieve(final.id, stream=True, starting_after=1))
    assert [e.sequence_number for e in resumed] == list(range(2, len(events)))
    assert "".join(e.delta for e in resumed if e.type == "response.output_text.delta") == text
    last = list(oai.responses.retrieve(final.id, stream=True, starting_after=len(events) - 2))
    assert [(e.type, e.sequence_number) for e in last] == [(kinds[-1], len(events) - 1)]
    assert last[0].response.output_text == text


def test_the_sdk_stream_helper_assembles_the_response(oai: openai.OpenAI, model: str) -> None:
    with oai.responses.stream(model=model, input="Errors should never", max_output_tokens=16) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text.startswith("pass silently.")
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_sync_response_and_errors(oai: openai.OpenAI, model: str) -> None:
    done = oai.responses.create(
        model=model, input=[{"role": "user", "content": "Errors should never"}], max_output_tokens=16
    )
    assert done.status == "completed" and done.output_text.startswith("pass silently.")
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model=model, input="x", max_output_tokens=513)
    assert err.value.param == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model=model, input="x", tools=[{"type": "web_search"}])
    assert err.value.param == "tools.0.type"
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_" + new_job_id().removeprefix("job_"))
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_unknown")


WEATHER = {"type": "function", **CHAT_WEATHER["function"]}


def test_function_tools(oai: openai.OpenAI, model: str) -> None:
    """A forced function call as a function_call output item (arguments valid against the schema), the same
    through the SDK's stream helper, and a function_call_output fed back as input."""
    import jsonschema

    forced = dict(
        model=model,
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
    )
    done = oai.responses.create(**forced)  # type: ignore[call-overload]
    calls = [item for item in done.output if item.type == "function_call"]
    assert done.status == "completed" and len(calls) == 1 and done.output_text == ""
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert done.tools[0].name == "get_weather"
    with oai.responses.stream(**forced) as stream:  # type: ignore[call-overload]
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    streamed = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(call.name, call.arguments)]  # greedy
    answer = oai.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=[WEATHER],
        max_output_tokens=4,
    )
    assert answer.status in ("completed", "incomplete") and answer.usage.input_tokens > done.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(
            model=model, input=[{"type": "function_call_output", "call_id": "call_x", "output": "x"}], tools=[WEATHER]
        )
    assert err.value.param == "input.0.tool_call_id"
