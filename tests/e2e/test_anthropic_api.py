"""Anthropic's Messages API with the official `anthropic` SDK, on a stack with API keys (two tenants)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
import requests

from tests.conftest import StackFactory
from tests.helpers import Stack
from tests.unit.test_tool_calls import WEATHER as CHAT_WEATHER

KEY, OTHER = "k-anthropic-one", "k-anthropic-two"
ASK = [{"role": "user", "content": "Errors should never"}]


@pytest.fixture(scope="module")
def keyed(stack_factory: StackFactory) -> Iterator[Stack]:
    stack = stack_factory({"web": {"api_keys": [KEY, OTHER]}})
    stack.start_worker()
    stack.start_web()
    yield stack


@pytest.fixture(scope="module")
def client(keyed: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=keyed.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(keyed: Stack) -> str:
    listed = requests.get(keyed.url + "/v1/models", headers={"x-api-key": KEY}, timeout=10).json()
    return str(listed["data"][0]["id"])


def http(stack: Stack, method: str, path: str, key: str = KEY, **kwargs: Any) -> requests.Response:
    return requests.request(method, stack.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kwargs)


def test_create_is_the_greedy_job_and_stays_with_its_key(client: anthropic.Anthropic, keyed: Stack, model: str) -> None:
    raw = client.messages.with_raw_response.create(model=model, max_tokens=16, messages=ASK, metadata={"user_id": "u"})
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.model == model
    assert msg.content[0].type == "text" and msg.content[0].text.startswith("pass silently.")
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    job_id = raw.headers["X-Job-Id"]
    assert msg.id == "msg_" + job_id.removeprefix("job_")
    job = http(keyed, "GET", f"/v1/jobs/{job_id}").json()
    assert job["output"]["text"] == msg.content[0].text
    assert msg.usage.output_tokens == job["output"]["usage"]["completion_tokens"] > 0
    assert msg.usage.input_tokens == job["output"]["usage"]["prompt_tokens"] > 0
    assert job_id in [j["id"] for j in http(keyed, "GET", "/v1/jobs").json()["data"]]
    submitted = http(keyed, "POST", "/v1/generate", json={"messages": ASK, "max_new_tokens": 16}).json()
    assert submitted["output"]["text"] == msg.content[0].text  # the same chat template, greedy
    # another key sees nothing of it, and cannot cancel it
    assert http(keyed, "GET", f"/v1/jobs/{job_id}", key=OTHER).status_code == 404
    assert http(keyed, "POST", f"/v1/jobs/{job_id}/cancel", key=OTHER).status_code == 404
    assert http(keyed, "POST", f"/v1/jobs/{job_id}/cancel").status_code == 409  # its owner reaches it: finished
    assert job_id not in [j["id"] for j in http(keyed, "GET", "/v1/jobs", key=OTHER).json()["data"]]


def test_prefill_and_system(client: anthropic.Anthropic, model: str) -> None:
    msg = client.messages.create(
        model=model,
        max_tokens=16,
        system=[{"type": "text", "text": ""}],
        messages=[*ASK, {"role": "assistant", "content": [{"type": "text", "text": "pass"}]}],
    )
    assert msg.content[0].text.startswith(" silently.")  # continues the prefill, not a new "pass silently."


def test_stream(client: anthropic.Anthropic, keyed: Stack, model: str) -> None:
    with client.messages.stream(model=model, max_tokens=16, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.startswith("pass silently.") and final.content[0].text == text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    body = {"model": model, "max_tokens": 16, "messages": ASK, "stream": True}
    with http(keyed, "POST", "/v1/messages", json=body, stream=True) as response:
        names = [
            line.removeprefix("event: ")
            for line in response.iter_lines(decode_unicode=True)
            if line.startswith("event:")
        ]
    deltas = names.count("content_block_delta")
    assert deltas >= 1
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_stop_sequences_and_count_tokens(client: anthropic.Anthropic, model: str) -> None:
    msg = client.messages.create(model=model, max_tokens=16, messages=ASK, stop_sequences=["silently"])
    assert msg.content[0].text == "pass " and msg.stop_reason == "stop_sequence" and msg.stop_sequence == "silently"
    two = client.messages.create(model=model, max_tokens=16, messages=ASK, stop_sequences=["ly.", "silent"])
    assert (two.content[0].text, two.stop_sequence) == ("pass ", "silent")  # the one the worker found first
    counted = client.messages.count_tokens(model=model, messages=ASK, system="Be brief.")
    full = client.messages.create(model=model, max_tokens=1, messages=ASK, system="Be brief.")
    assert counted.input_tokens == full.usage.input_tokens > 0
    assert full.stop_reason == "max_tokens"


def test_errors(client: anthropic.Anthropic, keyed: Stack, model: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=model, max_tokens=513, messages=ASK)
    assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in err.value.message
    tool = {"name": "f", "input_schema": {"type": "object"}}
    with pytest.raises(anthropic.BadRequestError, match=r"tool_choice\.name"):
        client.messages.create(
            model=model, max_tokens=8, messages=ASK, tools=[tool], tool_choice={"type": "tool", "name": "g"}
        )  # type: ignore[list-item]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError, match=r"messages\.0\.content\.0\.type"):
        client.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": [image]}])  # type: ignore[list-item]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=ASK)
    wrong = anthropic.Anthropic(base_url=keyed.url, api_key="k-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model=model, max_tokens=8, messages=ASK)
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert (
        http(keyed, "GET", "/v1/jobs", key="k-wrong").json()["error"]["code"] == "invalid_api_key"
    )  # other routes keep theirs


def test_openapi_documents_the_routes(keyed: Stack) -> None:
    document = http(keyed, "GET", "/openapi.json").json()
    operation = document["paths"]["/v1/messages"]["post"]
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "529" in operation["responses"] and "/v1/messages/count_tokens" in document["paths"]
    assert document["components"]["schemas"]["AnthropicMessageCreate"]["required"] == [
        "model",
        "messages",
        "max_tokens",
    ]


WEATHER = {
    "name": "get_weather",
    "description": "the weather in a city",
    "input_schema": CHAT_WEATHER["function"]["parameters"],
}


def test_tools_create_stream_and_result(client: anthropic.Anthropic, model: str) -> None:
    """A forced tool (tool_choice tool) as a tool_use block that validates against input_schema, the same
    streamed (content_block_start tool_use, input_json_delta), and a tool_result answered in the next turn."""
    import jsonschema

    forced: dict[str, Any] = dict(
        model=model, max_tokens=200, messages=ASK, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}
    )
    msg = client.messages.create(**forced)
    assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["tool_use"]
    use = msg.content[0]
    assert use.name == "get_weather" and use.id.startswith("call_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(**forced) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "get_weather", use.input)]  # greedy
    answer = client.messages.create(
        model=model,
        max_tokens=4,
        tools=[WEATHER],
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ],
    )
    assert answer.content[0].type == "text" and answer.usage.input_tokens > msg.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(
            model=model,
            max_tokens=4,
            messages=[
                *ASK,
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]},
            ],
        )
    assert "messages.2.content.0.tool_use_id" in err.value.message
