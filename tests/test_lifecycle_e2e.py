"""Deadlines and queue positions with real Celery workers: a running job stops at its deadline with its
partial text; positions of queued jobs decrease as a busy one-row engine drains them; the heartbeat's
sweep closes a late queued job without anyone reading it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import Stack, wait_until

pytestmark = pytest.mark.e2e

LONG_PROMPT = "Simple is better than complex. " * 400 + "Beautiful is better than"


def test_a_running_job_stops_at_its_deadline_with_its_partial_text(stack: Stack) -> None:
    body = {"prompt": LONG_PROMPT, "max_new_tokens": 512, "ignore_eos": True, "n": 4, "temperature": 1}
    made = requests.post(stack.url + "/v1/jobs", json=body, headers={"Cancel-After": "1s"}, timeout=30)
    assert made.status_code == 202, made.text
    job = stack.client().wait(made.json()["id"], timeout=60)
    assert job["status"] == "canceled", job
    assert job["error"]["code"] == "deadline_exceeded"
    assert job["started_at"] is not None and job["attempts"] == 1  # it ran, and was stopped
    assert job["output"]["finish_reason"] == "canceled"
    assert job["output"]["text"] and 0 < job["output"]["usage"]["completion_tokens"] < 4 * 512
    assert all(c["finish_reason"] == "time_limit" and c["text"] for c in job["output"]["choices"])
    assert job["completed_at"] >= job["deadline"] - 0.3
    assert job["completed_at"] - job["deadline"] < 5


@pytest.fixture(scope="module")
def one_row(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    """A stack whose engine decodes one sequence at a time; its worker starts inside the test."""
    s = Stack(tmp_path_factory.mktemp("one-row"), demo_model, {"engine": {"max_batch": 1}})
    s.start_web()
    yield s
    s.stop()


def test_positions_decrease_as_a_busy_worker_drains_the_queue(one_row: Stack) -> None:
    url = one_row.url + "/v1/jobs"
    body = {"prompt": "Beautiful is better than", "max_new_tokens": 96, "ignore_eos": True}
    ids = [requests.post(url, json=body, timeout=30).json()["id"] for _ in range(6)]
    late = requests.post(url, json={**body, "priority": "low"}, headers={"Cancel-After": "2s"}, timeout=30).json()
    last = ids[-1]
    assert requests.get(f"{url}/{last}", timeout=5).json()["queue_position"] == 5
    one_row.start_worker(wait=False)
    seen: list[tuple[int, Any]] = []

    def started() -> bool:
        job = requests.get(f"{url}/{last}", timeout=5).json()
        if job["status"] != "queued":
            return True
        if not seen or seen[-1][0] != job["queue_position"]:
            seen.append((job["queue_position"], job["estimated_start_seconds"]))
        return False

    wait_until(started, 120, 0.02, "the last job to start")
    positions = [p for p, _ in seen]
    assert positions == sorted(positions, reverse=True) and positions[0] == 5, seen
    assert len(set(positions)) >= 3, seen  # it moved up one by one as jobs ahead finished
    estimates = [e for _, e in seen if e is not None]
    assert estimates and all(e > 0 for e in estimates), seen  # from the measured completions
    record = wait_until(lambda: (r := one_row.record(late["id"]))["status"] != "queued" and r, 30, what="sweep")
    assert record["status"] == "canceled" and "deadline_exceeded" in record["error"]
    assert "started_at" not in record  # never ran: closed by the sweep or refused by the claim
    for job_id in ids:
        assert one_row.client().wait(job_id, timeout=60)["status"] == "succeeded"
