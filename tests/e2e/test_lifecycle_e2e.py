"""Deadlines and queue positions with real Celery workers: a running job stops at its deadline with its
partial text; positions of queued jobs decrease as a busy one-row engine drains them; the heartbeat's
sweep closes a late queued job without anyone reading it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until

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
    # each sample stopped at the deadline with its text so far: by the engine's own budget (time_limit) or by the
    # deadline sweep's cancel flag read between steps (canceled), whichever came first on this machine
    stops = [(c["finish_reason"], len(c["text"])) for c in job["output"]["choices"]]
    assert len(stops) == 4 and all(reason in ("time_limit", "canceled") and size for reason, size in stops), stops
    assert job["completed_at"] >= job["deadline"] - 0.3
    assert job["completed_at"] - job["deadline"] < 5


@pytest.fixture(scope="module")
def one_row(stack_factory: StackFactory) -> Stack:
    """A stack whose engine decodes one sequence at a time; its worker starts inside the test."""
    s = stack_factory({"engine": {"max_batch": 1}}, name="one-row")
    s.start_web()
    return s


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
    # From the measured completions (position 0 may read 0 s in the instant the one row is free).
    estimates = [e for p, e in seen if e is not None and p >= 1]
    assert estimates and all(e > 0 for e in estimates), seen
    record = wait_until(lambda: (r := one_row.record(late["id"]))["status"] != "queued" and r, 30, what="sweep")
    assert record["status"] == "canceled" and "deadline_exceeded" in record["error"]
    assert "started_at" not in record  # never ran: closed by the sweep or refused by the claim
    for job_id in ids:
        assert one_row.client().wait(job_id, timeout=60)["status"] == "succeeded"


def test_a_batch_past_its_completion_window_ends_expired(stack: Stack) -> None:
    short = {"prompt": "Errors should never", "max_new_tokens": 6}
    long = {"prompt": LONG_PROMPT, "max_new_tokens": 512, "ignore_eos": True, "n": 8, "temperature": 1}
    # The short lines first; 4 x 8 long samples outgrow engine.max_batch_tokens (each holds 2048 + 512), so the
    # last long line waits for room: however fast the machine, the long lines cannot all finish in 3 s.
    lines = [{"custom_id": "s0", "body": short}, {"custom_id": "s1", "body": short}]
    lines += [{"custom_id": f"l{i}", "body": long} for i in range(4)]
    made = requests.post(stack.url + "/v1/batches", json={"requests": lines, "completion_window": "3s"}, timeout=30)
    assert made.status_code == 202, made.text
    batch = made.json()
    assert batch["completion_window"] == "3s" and batch["expires_at"] - batch["created_at"] <= 3.01
    url = f"{stack.url}/v1/batches/{batch['id']}"
    final = wait_until(
        lambda: (b := requests.get(url, timeout=5).json())["status"] not in ("in_progress",) and b,
        60,
        what="the batch to end",
    )
    assert final["status"] == "expired" and final["expired_at"] is not None, final
    assert final["request_counts"] == {"total": 6, "completed": 2, "failed": 4}
    out = {
        line["custom_id"]: line for line in map(json.loads, requests.get(url + "/results", timeout=5).text.splitlines())
    }
    assert out["s0"]["error"] is None and out["s1"]["error"] is None
    for cid in ("l0", "l1", "l2"):
        assert out[cid]["error"]["code"] == "batch_expired"
        assert out[cid]["response"]["body"]["output"]["text"]  # stopped at the window with its partial text
    assert out["l3"]["error"]["code"] == "batch_expired"  # it may not have started


@pytest.mark.parametrize("window", ["2d", "25h", "0s", "soon"])
def test_a_bad_completion_window_is_refused(stack: Stack, window: str) -> None:
    native = requests.post(
        stack.url + "/v1/batches",
        timeout=30,
        json={"requests": [{"custom_id": "a", "body": {"prompt": "x"}}], "completion_window": window},
    )
    openai_form = requests.post(
        stack.url + "/v1/batches",
        timeout=30,
        json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": window},
    )
    for response in (native, openai_form):
        assert response.status_code == 400 and response.json()["error"]["param"] == "completion_window"
