"""The OpenAI-compatible routes with the official `openai` SDK: models, completions, chat, streams, errors, retries."""

from __future__ import annotations

import threading
from typing import Any

import openai
import pytest
import requests

from qwen_deploy.keys import JobKeys
from tests.helpers import Stack, wait_until

CHAT = [{"role": "user", "content": "Errors should never"}]
LONG = {"ignore_eos": True}  # vLLM-style extension, through extra_body


def job_count(stack: Stack) -> int:
    return sum(
        1
        for key in stack.redis.scan_iter(JobKeys(stack.settings.key_prefix).key("job_*"))
        if not key.endswith((":ev", ":webhooks"))
    )


def test_models(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    listed = oai.models.list()
    assert [m.id for m in listed.data] == [stack.settings.model.name_or_path.rstrip("/").rsplit("/", 1)[-1]]
    assert listed.data[0].object == "model" and isinstance(listed.data[0].created, int)
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"
    assert requests.post(stack.url + "/v1/models/downloads", json={}, timeout=10).status_code == 422  # still there


def test_completion(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    raw = oai.completions.with_raw_response.create(model=model, prompt="Beautiful is better than", max_tokens=8, seed=7)
    done = raw.parse()
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.choices[0].text.startswith(" ugly.") and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.total_tokens == done.usage.prompt_tokens + 8
    assert isinstance(done.created, int) and done.system_fingerprint is None
    job = requests.get(f"{stack.url}/v1/jobs/{raw.headers['X-Job-Id']}", timeout=10).json()
    assert job["status"] == "succeeded" and job["output"]["text"] == done.choices[0].text
    assert done.id == "cmpl-" + job["id"].removeprefix("job_")


def test_chat(oai: openai.OpenAI, model: str) -> None:
    done = oai.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=16, seed=1)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content.startswith("pass silently.")
    assert done.choices[0].finish_reason == "stop"
    parts = [
        {"role": "system", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": [{"type": "text", "text": "Errors should "}, {"type": "text", "text": "never"}]},
    ]
    again = oai.chat.completions.create(model=model, messages=parts, max_tokens=16)
    assert again.choices[0].message.content == done.choices[0].message.content


def test_a_repeated_prompt_reports_cached_tokens(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    """The worker's prefix cache serves the second of two equal chats: `prompt_tokens_details.cached_tokens` in
    the chat usage and in the job object (and the Responses API's `input_tokens_details`)."""
    system = "Answer in the words of the Zen of Python. " * 6
    messages: Any = [{"role": "system", "content": system}, *CHAT]
    first = oai.chat.completions.create(model=model, messages=messages, max_tokens=4)
    raw = oai.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=4)
    again = raw.parse()
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    job = requests.get(f"{stack.url}/v1/jobs/{raw.headers['X-Job-Id']}", timeout=10).json()
    assert job["output"]["usage"]["prompt_tokens_details"] == {"cached_tokens": cached}
    response = oai.responses.create(model=model, instructions=system, input=CHAT[0]["content"], max_output_tokens=4)
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens > 0


def test_chat_stream(oai: openai.OpenAI, model: str) -> None:
    chunks = list(
        oai.chat.completions.create(
            model=model, messages=CHAT, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("pass silently.")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    with oai.chat.completions.stream(model=model, messages=CHAT, max_tokens=16) as stream:
        assert stream.get_final_completion().choices[0].message.content == text  # the SDK's own accumulator


def test_completion_stream(oai: openai.OpenAI, model: str) -> None:
    chunks = list(
        oai.completions.create(model=model, prompt=["Beautiful is better than"], max_tokens=12, stream=True, seed=3)
    )
    text = "".join(c.choices[0].text for c in chunks)
    assert text.startswith(" ugly.\nExplicit is better than")
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_disconnect_cancels_the_job(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=512, stream=True, extra_body=LONG
    )
    job_id = raw.headers["X-Job-Id"]
    events = iter(raw.parse())
    next(events), next(events)
    events.close()  # type: ignore[attr-defined]
    raw.http_response.close()
    job = wait_until(
        lambda: (
            (j := requests.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json())["status"]
            in ("canceled", "succeeded")
            and j
        ),
        30,
        0.05,
        "the job to end",
    )
    assert job["status"] == "canceled" and job["progress"]["tokens"] < 512


def test_errors_name_the_param(oai: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=model, prompt="x", max_tokens=513)
    assert err.value.status_code == 400 and err.value.param == "max_tokens"
    assert "max_tokens is 513" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=513)
    assert err.value.param == "max_completion_tokens"
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=model,
            messages=CHAT,
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    assert err.value.param == "tool_choice.function.name" and err.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=CHAT, presence_penalty=2.5)
    assert err.value.param == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x", "name": "me"}])
    assert err.value.param == "messages.0.name"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=CHAT, top_logprobs=2)
    assert err.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=CHAT, n=9)
    assert err.value.param == "n"
    done = oai.chat.completions.create(
        model=model, messages=CHAT, max_tokens=4, presence_penalty=0, user="u1", frequency_penalty=0.0
    )
    assert done.choices[0].message.content.startswith("pass")


def test_a_canceled_job_answers_200_and_is_not_retried(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    before = job_count(stack)
    result: dict[str, Any] = {}

    def call() -> None:
        raw = oai.chat.completions.with_raw_response.create(model=model, messages=CHAT, max_tokens=512, extra_body=LONG)
        result.update(job=raw.headers["X-Job-Id"], done=raw.parse())

    thread = threading.Thread(target=call)
    thread.start()
    running = wait_until(
        lambda: [
            k.split(":")[-1]
            for k in stack.redis.scan_iter(JobKeys(stack.settings.key_prefix).key("job_*"))
            if not k.endswith((":ev", ":webhooks"))
            and stack.redis.hget(k, "status") == "running"
            and int(stack.redis.hget(k, "tokens") or 0) >= 16
        ],
        30,
        0.02,
        "a running job with 16 tokens",
    )
    requests.post(f"{stack.url}/v1/jobs/{running[0]}/cancel", timeout=10)
    thread.join(60)
    assert result["job"] == running[0]
    assert result["done"].choices[0].finish_reason == "length"
    assert result["done"].choices[0].message.content.startswith("pass silently.")
    assert job_count(stack) == before + 1  # no re-submission by the SDK's retries


def test_idempotency_key_returns_the_same_job(oai: openai.OpenAI, model: str) -> None:
    headers = {"Idempotency-Key": "openai-same-1"}
    first = oai.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=4, extra_headers=headers
    )
    again = oai.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=4, extra_headers=headers
    )
    assert first.headers["X-Job-Id"] == again.headers["X-Job-Id"]
    assert first.parse().id == again.parse().id


def test_plain_http_errors_are_openai_shaped(stack: Stack) -> None:
    url = stack.url + "/v1/chat/completions"
    reply = requests.post(url, data=b"{", headers={"Content-Type": "application/json"}, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
    reply = requests.post(url, json={"messages": CHAT}, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"


def test_job_body_n_and_logprobs_are_validated(http) -> None:  # type: ignore[no-untyped-def]
    for body, param in (
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
    ):
        reply = http.post("/v1/jobs", json={"prompt": "x", **body})
        assert reply.status_code == 422 and reply.get_json()["error"]["param"] == param, (body, reply.get_json())
    reply = http.post(
        "/v1/jobs",
        json={"prompt": "Errors should never", "n": 2, "logprobs": True, "top_logprobs": 1, "max_new_tokens": 2},
    )
    assert reply.status_code == 202
