"""The OpenAPI document matches the live app: schemathesis over every route, no 5xx, schema-conformant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from qwen_deploy.client import Client
from tests.conftest import StackFactory
from tests.helpers import ROOT, Stack

pytestmark = pytest.mark.slow

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance"
)


@pytest.fixture(scope="module")
def short_stack(stack_factory: StackFactory) -> Stack:
    """Short waits and streams, so generated waits and never-ending queued jobs stay cheap."""
    limits = {"max_wait": 2, "max_stream": 2, "generation_budget": 1, "soft_time_limit": 2, "hard_time_limit": 3}
    s = stack_factory({"limits": limits}, name="openapi")
    s.start_worker()
    s.start_web()
    return s


def test_schemathesis_finds_no_server_errors_or_schema_mismatches(short_stack: Stack, tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            short_stack.url + "/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "5",  # per operation: ~40 operations documented
            "--request-timeout",
            "20",
            "--seed",
            "1",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = out.stdout[-4000:]
    assert out.returncode == 0, summary
    assert "passed" in summary and "failures" not in summary.lower().split("summary")[-1], summary


def test_document_and_viewer(short_stack: Stack) -> None:
    doc = requests.get(short_stack.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/batches", "/v1/models/exports", "/readyz"} <= set(doc["paths"])
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].split("/")[-1].startswith("JobCreate")
    viewer = requests.get(short_stack.url + "/docs", timeout=10)
    assert viewer.status_code == 200 and "swagger" in viewer.text.lower()


def test_document_caps_come_from_the_settings() -> None:
    from qwen_deploy.config import load_settings
    from web import create_app

    settings = load_settings(
        overrides={
            "limits": {"max_wait": 2},
            "redis_url": "redis://127.0.0.1:1/0",
            "generation": {"max_new_tokens_cap": 100, "default_max_new_tokens": 10},
        }
    )
    doc = create_app(settings).test_client().get("/openapi.json").get_json()
    body = next(v for k, v in doc["components"]["schemas"].items() if k.split(".")[0] == "JobCreate")
    assert body["properties"]["max_new_tokens"]["maximum"] == 100
    assert "1 to 100" in body["properties"]["max_new_tokens"]["description"]
    wait = next(p for p in doc["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "wait")
    assert [b.get("maximum") for b in wait["schema"]["anyOf"]] == [2.0, None]


def sse(url: str, headers: dict[str, str] | None = None) -> list[tuple[str | None, str, str]]:
    """(id, event, data) of a whole SSE response."""
    events, current = [], {"id": None, "event": "message", "data": ""}
    with requests.get(url, headers=headers or {}, stream=True, timeout=30) as response:
        for line in response.iter_lines(decode_unicode=True):
            if not line:
                if current["data"]:
                    events.append((current["id"], current["event"], current["data"]))
                current = {"id": None, "event": "message", "data": ""}
            elif ":" in line and not line.startswith(":"):
                key, _, value = line.partition(":")
                current[key] = value.strip()
    return events


def test_streams_are_capped_and_resume_with_last_event_id(short_stack: Stack) -> None:
    queued = requests.post(short_stack.url + "/v1/models/downloads", json={"repo_id": "org/none"}, timeout=10).json()
    capped = sse(f"{short_stack.url}/v1/jobs/{queued['id']}/events")  # no convert worker: stays queued
    assert capped[-1][1] == "timeout"
    client = Client(short_stack.url)
    job = client.wait(client.submit("Beautiful is better than", max_new_tokens=64, ignore_eos=True)["id"])
    url = f"{short_stack.url}/v1/jobs/{job['id']}/events"
    events = sse(url)
    tokens = [(i, json.loads(d)["text"]) for i, e, d in events if e == "token"]
    assert "".join(t for _, t in tokens) == job["output"]["text"]
    resumed = sse(url, {"Last-Event-ID": tokens[0][0]})
    rest = "".join(json.loads(d)["text"] for _, e, d in resumed if e == "token")
    assert tokens[0][1] + rest == job["output"]["text"]
    assert resumed[-1][1] == "done"
