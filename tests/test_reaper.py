"""Nothing lost: jobs whose worker vanished, or whose message was lost, are found and finished."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwen_deploy.client import Client
from qwen_deploy.queues import INTERACTIVE
from tests.helpers import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LONG = {"prompt": "Simple is better than complex. " * 400 + "Beautiful is better than",
        "max_new_tokens": 512, "ignore_eos": True}


@pytest.fixture(scope="module")
def reaping(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    limits = {"generation_budget": 3, "soft_time_limit": 4, "hard_time_limit": 5, "reap_after": 2,
              "reap_grace": 1, "reap_interval": 0.5}
    s = Stack(tmp_path_factory.mktemp("reaper"), demo_model, {"limits": limits})
    s.start_web()
    yield s
    s.stop()


def test_job_of_a_killed_worker_parent_and_child_is_rerun(reaping: Stack) -> None:
    reaping.start_worker()
    client = Client(reaping.url)
    job = client.submit(**LONG)
    wait_until(lambda: client.get(job["id"])["progress"]["tokens"] > 0, 30, 0.005, "the job to run")
    os.killpg(reaping.worker.pid, signal.SIGKILL)  # parent and child at once: nobody requeues
    reaping.worker.wait()
    assert client.get(job["id"])["status"] == "running"
    assert reaping.redis.hlen("unacked") == 1  # the broker holds it until its visibility timeout (an hour)
    reaping.start_worker()
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    # the re-run's own delivery is acked just after the job ends; no copy is left to run a third time
    wait_until(lambda: reaping.redis.hlen("unacked") == 0, 10, 0.05, "the ack")
    assert reaping.redis.llen(INTERACTIVE) == 0


def test_job_whose_message_was_lost_is_requeued(reaping: Stack) -> None:
    reaping.stop_worker()
    client = Client(reaping.url)
    job = client.submit("Errors should never", max_new_tokens=6)
    assert reaping.redis.rpop(INTERACTIVE)  # a consumer popped it and died
    reaping.start_worker()
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded" and done["output"]["text"].startswith(" pass silently.")
    assert done["attempts"] == 1


def test_queued_jobs_behind_a_long_queue_are_left_alone(reaping: Stack) -> None:
    reaping.stop_worker()
    client = Client(reaping.url)
    ids = [client.submit("Errors should never", max_new_tokens=3)["id"] for _ in range(3)]
    reaping.start_worker()
    done = [client.wait(i, timeout=60) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 3
    assert [d["attempts"] for d in done] == [1, 1, 1]
