"""Batches end to end: JSONL in, per-line errors, batched generation equal to single jobs, priority, cancel."""

from __future__ import annotations

import json
import this
from typing import Any

import requests

from qwen_deploy.batches import BatchStore
from qwen_deploy.client import Client
from tests.helpers import Stack, wait_until

ZEN = "".join(this.d.get(c, c) for c in this.s).splitlines()[2:]
PREFIXES = [" ".join(line.split()[:3]) for line in ZEN]


def post_jsonl(stack: Stack, lines: list[Any]) -> requests.Response:
    body = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return requests.post(
        stack.url + "/v1/batches", data=body.encode(), headers={"Content-Type": "application/x-ndjson"}, timeout=30
    )


def line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/jobs", "body": body}


def batch(stack: Stack, batch_id: str) -> dict[str, Any]:
    return requests.get(f"{stack.url}/v1/batches/{batch_id}", timeout=10).json()


def results(stack: Stack, batch_id: str, after: int = 0) -> list[dict[str, Any]]:
    text = requests.get(f"{stack.url}/v1/batches/{batch_id}/results", params={"after": after}, timeout=10).text
    return [json.loads(x) for x in text.splitlines()]


def wait_batch(stack: Stack, batch_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_until(
        lambda: (b := batch(stack, batch_id))["status"] in ("completed", "cancelled", "failed") and b,
        timeout,
        0.05,
        "the batch to end",
    )


def test_jsonl_batch_with_invalid_lines(stack: Stack) -> None:
    lines: list[Any] = [
        line(f"r{i}", {"prompt": PREFIXES[i % len(PREFIXES)], "max_new_tokens": 12}) for i in range(100)
    ]
    lines[3] = line("r3", {"prompt": "x", "max_new_tokens": 513})
    lines[10] = '{"custom_id": "r10", "body": '
    lines[20] = line("r20", {"messages": []})
    lines[30] = {"custom_id": "r30", "method": "GET", "url": "/v1/models", "body": {"prompt": "x"}}
    response = post_jsonl(stack, lines)
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["request_counts"] == {"total": 100, "completed": 0, "failed": 4}
    done = wait_batch(stack, created["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 100, "completed": 96, "failed": 4}
    out = results(stack, created["id"])
    assert len(out) == 100 and len({o["custom_id"] for o in out if o["custom_id"]}) == 99
    errors = {o["error"]["line"]: o["error"] for o in out if o["error"]}
    assert set(errors) == {4, 11, 21, 31}
    assert (errors[4]["code"], errors[4]["param"]) == ("max_new_tokens_too_large", "max_new_tokens")
    assert errors[11]["code"] == "invalid_json"
    assert (errors[21]["code"], errors[21]["param"]) == ("invalid_value", "messages")
    assert errors[31]["code"] == "invalid_url"
    by_id = {o["custom_id"]: o for o in out if not o["error"]}
    first = by_id["r0"]["response"]
    assert first["status_code"] == 200
    assert first["body"]["output"]["text"].startswith(" than ugly.")
    assert by_id["r9"]["response"]["body"]["output"]["text"].startswith(" pass silently.")


def test_batched_outputs_equal_single_jobs(stack: Stack, client: Client) -> None:
    bodies = [
        {"prompt": p, "max_new_tokens": 6 + 3 * i, **({"stop": ["."]} if i % 3 == 0 else {})}
        for i, p in enumerate(PREFIXES)
    ]
    bodies.append({"messages": [{"role": "user", "content": "Errors should never"}], "max_new_tokens": 20})
    payload = {"requests": [{"custom_id": f"q{i}", "body": b} for i, b in enumerate(bodies)], "metadata": {"k": "v"}}
    created = requests.post(stack.url + "/v1/batches", json=payload, timeout=30).json()
    assert created["metadata"] == {"k": "v"}
    singles = [client.submit(**b)["id"] for b in bodies]
    wait_batch(stack, created["id"])
    batched = {o["custom_id"]: o["response"]["body"]["output"] for o in results(stack, created["id"])}
    for i, job_id in enumerate(singles):
        single = client.wait(job_id)["output"]
        # How much of a prompt the prefix cache served depends on what ran before, not on batching.
        for output in (single, batched[f"q{i}"]):
            output["usage"].pop("prompt_tokens_details", None)
        assert batched[f"q{i}"] == single, (i, bodies[i])


def test_results_stream_before_completion_and_interactive_first(stack: Stack, client: Client) -> None:
    long = {"prompt": "Beautiful is better than", "max_new_tokens": 200, "ignore_eos": True}
    created = post_jsonl(stack, [line(f"l{i}", long) for i in range(96)]).json()
    wait_until(lambda: batch(stack, created["id"])["request_counts"]["completed"] > 0, 120, 0.05, "a first chunk")
    job = client.submit("Errors should never", max_new_tokens=6)
    early = results(stack, created["id"])
    status = batch(stack, created["id"])
    assert 0 < len(early) < 96 and status["status"] == "in_progress"
    rest = results(stack, created["id"], after=len(early))
    done = client.wait(job["id"])
    assert done["status"] == "succeeded"
    final = wait_batch(stack, created["id"])
    assert done["completed_at"] < final["completed_at"]
    everything = results(stack, created["id"])
    assert len(everything) == 96 and everything[: len(early)] == early
    assert everything[len(early) : len(early) + len(rest)] == rest


def test_cancel_mid_batch(stack: Stack) -> None:
    long = {"prompt": "Beautiful is better than", "max_new_tokens": 300, "ignore_eos": True}
    created = post_jsonl(stack, [line(f"c{i}", long) for i in range(160)]).json()
    record = BatchStore(stack.redis, stack.settings.key_prefix).key(created["id"])

    def running() -> bool:  # a micro-batch has started (its delivery is counted) and is not recorded yet
        started, recorded = stack.redis.hkeys(record + ":tries"), stack.redis.smembers(record + ":chunks")
        return bool(set(started) - set(recorded))

    wait_until(
        lambda: batch(stack, created["id"])["request_counts"]["completed"] > 0 and running(),
        120,
        0.05,
        "a first chunk, then another one running",
    )
    answer = requests.post(f"{stack.url}/v1/batches/{created['id']}/cancel", timeout=10)
    assert answer.status_code == 202 and answer.json()["status"] == "cancelling"
    final = wait_batch(stack, created["id"], timeout=60)
    counts = final["request_counts"]
    assert final["status"] == "cancelled"
    assert counts["completed"] + counts["failed"] == 160 and counts["failed"] >= 64
    lines = results(stack, created["id"])
    codes = {o["error"]["code"] for o in lines if o["error"]}
    assert codes == {"batch_cancelled"}
    stopped = [o for o in lines if o["response"] and o["response"]["body"]["output"]["finish_reason"] == "canceled"]
    assert stopped, "the running micro-batch was not stopped mid-flight"
    assert all(0 < o["response"]["body"]["output"]["usage"]["completion_tokens"] < 300 for o in stopped)
    again = requests.post(f"{stack.url}/v1/batches/{created['id']}/cancel", timeout=10)
    assert again.status_code == 409 and again.json()["error"]["code"] == "batch_finished"


def test_batch_rejections(stack: Stack) -> None:
    dup = post_jsonl(stack, [line("a", {"prompt": "x"}), line("a", {"prompt": "y"})])
    assert dup.status_code == 422 and dup.json()["error"]["code"] == "duplicate_custom_id"
    empty = post_jsonl(stack, [])
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "empty_batch"
    wrong = requests.post(stack.url + "/v1/batches", data="x", headers={"Content-Type": "text/plain"}, timeout=10)
    assert wrong.status_code == 415
    missing = requests.get(stack.url + "/v1/batches/batch_nope", timeout=10)
    assert missing.status_code == 404
