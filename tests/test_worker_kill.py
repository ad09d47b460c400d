"""A worker child killed mid-job: the job still ends (re-run, or failed after bounded deliveries)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_deploy.client import Client
from tests.helpers import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LONG = {"prompt": "Simple is better than complex. " * 400 + "Beautiful is better than",
        "max_new_tokens": 512, "ignore_eos": True}


@pytest.fixture(scope="module")
def kill_stack(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("kill"), demo_model)
    s.start_worker()
    s.start_web()
    yield s
    s.stop()


def kill_child_when_running(stack: Stack, client: Client, job_id: str, attempt: int) -> int:
    """SIGKILL the child that runs `job_id` once it has produced tokens in the given attempt."""
    def running() -> bool:
        job = client.get(job_id)
        return job["attempts"] == attempt and job["status"] == "running" and job["progress"]["tokens"] > 0
    wait_until(running, 60, 0.005, f"attempt {attempt} running")
    pid = int(stack.record(job_id)["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_child_job_is_rerun_and_next_job_succeeds(kill_stack: Stack) -> None:
    client = kill_stack.client()
    job = client.submit(**LONG)
    killed = kill_child_when_running(kill_stack, client, job["id"], attempt=1)
    done = client.wait(job["id"], timeout=90)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["output"]["usage"]["completion_tokens"] == 512
    assert kill_stack.child_pid() != killed
    after = client.generate("Errors should never", max_new_tokens=6)
    assert after["status"] == "succeeded" and after["output"]["text"].startswith(" pass silently.")


def test_job_that_keeps_killing_its_worker_fails_after_max_deliveries(kill_stack: Stack) -> None:
    client = kill_stack.client()
    job = client.submit(**LONG)
    kill_child_when_running(kill_stack, client, job["id"], attempt=1)
    kill_child_when_running(kill_stack, client, job["id"], attempt=2)
    done = client.wait(job["id"], timeout=90)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "worker_lost"
    assert "died 2 time(s)" in done["error"]["message"]
    assert done["attempts"] == 3
    after = client.generate("Beautiful is better than", max_new_tokens=6)
    assert after["status"] == "succeeded" and after["output"]["text"].startswith(" ugly.")
