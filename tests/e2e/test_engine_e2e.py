"""The engine through the whole system (HTTP → Redis → Celery prefork worker): concurrent jobs are
decoded together and still return exactly their one-at-a-time text; late arrivals join mid-flight;
a cancel stops one job and spares its siblings."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from qwen_deploy.client import Client
from tests.helpers import Stack, wait_until
from tests.unit.test_handler import make_handler
from worker.handler import GenerationRequest, ModelHandler

BODIES: list[dict[str, Any]] = [
    {"prompt": "Beautiful is better than", "max_new_tokens": 12},
    {"prompt": "Errors should never", "max_new_tokens": 40},
    {"prompt": "Simple is better than", "max_new_tokens": 3},
    {"prompt": "Now is better than", "max_new_tokens": 64, "stop": ["never"]},
    {"messages": [{"role": "user", "content": "Errors should never"}], "max_new_tokens": 20},
    {
        "messages": [{"role": "system", "content": "Zen"}, {"role": "user", "content": "Flat is better than"}],
        "max_new_tokens": 30,
    },
    {"prompt": "In the face of ambiguity,", "max_new_tokens": 25, "stop": ["guess", "\n"]},
    {"prompt": "Readability", "max_new_tokens": 50, "ignore_eos": True},
    {"prompt": "Beautiful is better than", "max_new_tokens": 16, "temperature": 0.8, "seed": 11},
    {"prompt": "Special cases", "max_new_tokens": 16, "temperature": 1.2, "top_p": 0.9, "seed": 5},
    {
        "prompt": "Errors should never",
        "max_new_tokens": 16,
        "temperature": 1,
        "top_k": 5,
        "seed": 1,
        "repetition_penalty": 2,
    },
    {"prompt": "There should be one", "max_new_tokens": 33},
    {"prompt": "If the implementation is hard to explain,", "max_new_tokens": 18},
    {"prompt": "Namespaces are one", "max_new_tokens": 9},
]


@pytest.fixture(scope="module")
def local(demo_model: Path) -> ModelHandler:
    """The same model in this process, one request at a time: the reference."""
    return make_handler(str(demo_model))


def expected(local: ModelHandler, body: dict[str, Any]) -> str:
    return local.generate(GenerationRequest.from_dict(body)).text


def overlap(jobs: list[dict[str, Any]]) -> int:
    """The most jobs that were running at one instant."""
    edges = sorted([(j["started_at"], 1) for j in jobs] + [(j["completed_at"], -1) for j in jobs])
    best = now = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def test_concurrent_jobs_equal_their_one_at_a_time_text(stack: Stack, local: ModelHandler) -> None:
    with ThreadPoolExecutor(len(BODIES)) as pool:
        ids = list(pool.map(lambda b: Client(stack.url).submit(**b)["id"], BODIES))
    client = stack.client()
    done = [client.wait(i, timeout=60) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * len(BODIES)
    assert [d["output"]["text"] for d in done] == [expected(local, b) for b in BODIES]
    assert [d["output"]["finish_reason"] for d in done][3] == "stop"
    assert overlap(done) >= 4, "the jobs were not decoded together"


def test_a_late_arrival_joins_mid_flight(stack: Stack, local: ModelHandler) -> None:
    client = stack.client()
    long = {"prompt": "Beautiful is better than", "max_new_tokens": 500, "ignore_eos": True}
    first = client.submit(**long)
    wait_until(lambda: int(stack.record(first["id"]).get("tokens") or 0) > 0, 30, 0.01, "the long job to stream")
    shorts = [client.submit(**b) for b in BODIES[:3]]
    done = [client.wait(s["id"], timeout=30) for s in shorts]
    long_done = client.wait(first["id"], timeout=60)
    assert [d["output"]["text"] for d in done] == [expected(local, b) for b in BODIES[:3]]
    assert all(d["completed_at"] < long_done["completed_at"] for d in done), "short jobs waited for the long one"
    assert long_done["output"]["text"] == expected(local, long)


def test_cancel_mid_flight_stops_one_and_spares_its_siblings(stack: Stack, local: ModelHandler) -> None:
    client = stack.client()
    bodies = [
        {"prompt": p, "max_new_tokens": 250, "ignore_eos": True}
        for p in ("Beautiful is better than", "Errors should never", "Simple is better than")
    ]
    jobs = [client.submit(**b) for b in bodies]
    wait_until(
        lambda: all(int(stack.record(j["id"]).get("tokens") or 0) > 0 for j in jobs), 30, 0.01, "all three to stream"
    )
    asked = time.time()
    assert client.cancel(jobs[1]["id"])["status"] in ("canceling", "canceled")
    done = [client.wait(j["id"], timeout=60) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded", "canceled", "succeeded"]
    canceled = done[1]["output"]
    assert canceled["finish_reason"] == "canceled" and 0 < canceled["usage"]["completion_tokens"] < 250
    assert expected(local, bodies[1]).startswith(canceled["text"])
    assert [done[0]["output"]["text"], done[2]["output"]["text"]] == [
        expected(local, bodies[0]),
        expected(local, bodies[2]),
    ]
    print(f"\nENGINE cancel_latency_ms={1000 * (done[1]['completed_at'] - asked):.0f}")


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["label", "score", "tags"],
    "additionalProperties": False,
}


def test_structured_output_in_a_batch_and_a_job(stack: Stack) -> None:
    """The demo model only knows the Zen of Python; constrained, every line is JSON valid for the schema."""
    import json

    import jsonschema
    import requests

    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}
    lines = [
        {
            "custom_id": f"s{i}",
            "body": {
                "prompt": p,
                "max_new_tokens": 60,
                "response_format": fmt,
                **({"temperature": 0.9, "seed": i} if i % 2 else {}),
            },
        }
        for i, p in enumerate(["Beautiful is better than", "Errors should never", "Flat is", "Now is"] * 2)
    ]
    created = requests.post(stack.url + "/v1/batches", json={"requests": lines}, timeout=30).json()
    url = f"{stack.url}/v1/batches/{created['id']}"
    final = wait_until(lambda: (b := requests.get(url, timeout=10).json())["status"] == "completed" and b, 60)
    assert final["request_counts"]["completed"] == len(lines)
    out = [json.loads(x) for x in requests.get(url + "/results", timeout=10).text.splitlines()]
    for line in out:
        body = line["response"]["body"]["output"]
        assert body["finish_reason"] == "stop", body
        jsonschema.validate(json.loads(body["text"]), SCHEMA)
    job = stack.client().generate("Errors should never", max_new_tokens=40, response_format={"type": "json_object"})
    assert isinstance(json.loads(job["output"]["text"]), dict)
