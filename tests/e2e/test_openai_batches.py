"""Files and batches with the official `openai` SDK: upload, batch of chat lines, output/error files, listing."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.helpers import Stack, wait_until


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_line(custom_id: str, model: str, content: str, max_tokens: int) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens},
    }


def test_files(oai: openai.OpenAI) -> None:
    uploaded = oai.files.create(file=("notes.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == 9 and uploaded.filename == "notes.jsonl"
    assert oai.files.retrieve(uploaded.id).purpose == "batch"
    assert oai.files.content(uploaded.id).text == '{"a": 1}\n'
    assert uploaded.id in [f.id for f in oai.files.list()]
    assert oai.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(uploaded.id)
    with pytest.raises(openai.BadRequestError) as err:
        oai.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert err.value.param == "purpose"


def test_batch_of_chat_lines(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    lines = [
        chat_line("zen-1", model, "Errors should never", 16),
        chat_line("zen-2", model, "Beautiful is better than", 16),
        chat_line("too-long", model, "x", 513),
    ]
    uploaded = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "zen"}
    )
    assert batch.endpoint == "/v1/chat/completions" and batch.input_file_id == uploaded.id
    assert batch.status == "in_progress" and batch.metadata == {"run": "zen"}
    done = wait_until(
        lambda: (b := oai.batches.retrieve(batch.id)).status == "completed" and b, 60, 0.1, "a completed batch"
    )
    assert done.request_counts.total == 3 and done.request_counts.completed == 2 and done.request_counts.failed == 1
    output = {x["custom_id"]: x for x in map(json.loads, oai.files.content(done.output_file_id).text.splitlines())}
    assert set(output) == {"zen-1", "zen-2"}
    body = output["zen-1"]["response"]["body"]
    assert output["zen-1"]["response"]["status_code"] == 200
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["choices"][0]["message"]["content"].startswith("pass silently.")
    assert output["zen-2"]["response"]["body"]["choices"][0]["message"]["content"] == "ugly."
    assert output["zen-2"]["response"]["body"]["choices"][0]["finish_reason"] == "stop"
    errors = [json.loads(x) for x in oai.files.content(done.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["error"]["param"]) for e in errors] == [("too-long", "max_tokens")]
    assert oai.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_lines_sharing_an_instruction_report_cached_tokens(oai: openai.OpenAI, model: str) -> None:
    """Lines of one micro-batch under a common instruction: it is computed once, and every output line's usage
    says how many prompt tokens were reused."""
    instruction = "Answer in the words of the Zen of Python. " * 6
    lines = [
        chat_line(f"doc-{i}", model, instruction + doc, 4) for i, doc in enumerate(["Errors", "Simple is", "Flat"])
    ]
    uploaded = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_until(
        lambda: (b := oai.batches.retrieve(batch.id)).status == "completed" and b, 60, 0.1, "a completed batch"
    )
    output = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    usages = [line["response"]["body"]["usage"] for line in output]
    assert len(usages) == 3
    assert all(0 < u["prompt_tokens_details"]["cached_tokens"] < u["prompt_tokens"] for u in usages)


def test_jsonl_body_with_completion_lines(oai: openai.OpenAI, stack: Stack, model: str) -> None:
    lines = [
        {
            "custom_id": "c1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": "Beautiful is better than", "max_tokens": 6},
        }
    ]
    reply = requests.post(
        stack.url + "/v1/batches", data=jsonl(lines), headers={"Content-Type": "application/x-ndjson"}, timeout=10
    )
    assert reply.status_code == 202 and reply.json()["endpoint"] == "/v1/completions"
    batch_id = reply.json()["id"]
    wait_until(
        lambda: requests.get(f"{stack.url}/v1/batches/{batch_id}", timeout=10).json()["status"] == "completed",
        60,
        0.1,
        "a completed batch",
    )
    line = json.loads(requests.get(f"{stack.url}/v1/batches/{batch_id}/results", timeout=10).text)
    body = line["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"].startswith(" ugly.")

    first = oai.batches.list(limit=1)
    assert [b.id for b in first.data] == [batch_id] and first.has_more is True  # newest first
    second = oai.batches.list(limit=1, after=batch_id)
    assert len(second.data) == 1 and second.data[0].id != batch_id
    assert batch_id in [b.id for b in oai.batches.list(limit=100).data]
    mixed = [*lines, {**lines[0], "custom_id": "c2", "url": "/v1/chat/completions"}]
    reply = requests.post(
        stack.url + "/v1/batches", data=jsonl(mixed), headers={"Content-Type": "application/x-ndjson"}, timeout=10
    )
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "mixed_endpoints"


REVIEW = {
    "type": "object",
    "properties": {"verdict": {"enum": ["good", "bad"]}, "score": {"type": "integer", "minimum": 0, "maximum": 5}},
    "required": ["verdict", "score"],
    "additionalProperties": False,
}


def test_structured_output_through_the_sdk(oai: openai.OpenAI, model: str) -> None:
    """`response_format` json_schema on a batch of chat lines and on a direct call: every answer is JSON that
    validates against the schema (the demo model only knows the Zen of Python, so the grammar does it)."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}}
    lines = [chat_line(f"r{i}", model, text, 48) for i, text in enumerate(["Errors should never", "Flat is", "Now"])]
    for line in lines:
        line["body"]["response_format"] = fmt
    uploaded = oai.files.create(file=("reviews.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_until(
        lambda: (b := oai.batches.retrieve(batch.id)).status == "completed" and b, 60, 0.1, "a completed batch"
    )
    assert done.request_counts.completed == 3 and done.request_counts.failed == 0
    output = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == ["r0", "r1", "r2"]
    for x in output:
        choice = x["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), REVIEW)
    direct = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Beautiful is"}], max_tokens=48, response_format=fmt
    )  # type: ignore[arg-type]
    jsonschema.validate(json.loads(direct.choices[0].message.content or ""), REVIEW)
