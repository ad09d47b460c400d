"""The Responses API with the official `openai` SDK: background jobs, polling, cancel, resumable streams."""

from __future__ import annotations

import openai
import pytest
import requests

from qwen_deploy.job_records import new_job_id
from tests.helpers import Stack, wait_until

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
    assert err.value.param == "tools"
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_" + new_job_id().removeprefix("job_"))
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_unknown")
