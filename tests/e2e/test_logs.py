"""Worker logs: one JSON line per job lifecycle event, with ids and token counts, no prompt or token."""

from __future__ import annotations

import json

from qwen_deploy.client import Client
from tests.conftest import FAKE_HF_TOKEN
from tests.helpers import Stack, wait_until


def events(stack: Stack, job_id: str) -> list[dict]:
    found = []
    for line in stack.log_path.read_text().splitlines():
        if line.startswith("{"):
            data = json.loads(line)
            if data.get("id") == job_id:
                found.append(data)
    return found


def test_lifecycle_events_are_json_lines_without_prompt_or_secrets(stack: Stack, client: Client) -> None:
    prompt = "Errors should never"
    job = client.generate(prompt, max_new_tokens=5)
    lines = wait_until(lambda: (e := events(stack, job["id"])) and e[-1]["event"] == "job.finished" and e, 10)
    assert [e["event"] for e in lines] == ["job.started", "job.finished"]
    done = lines[-1]
    assert (done["status"], done["queue"], done["completion_tokens"]) == ("succeeded", "interactive", 5)
    assert done["prompt_tokens"] == job["output"]["usage"]["prompt_tokens"] and done["run_ms"] > 0
    assert {"time", "level", "logger"} <= set(done)
    text = stack.log_path.read_text()
    assert prompt not in text and FAKE_HF_TOKEN not in text
