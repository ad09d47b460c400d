"""A killed child's successor takes over the jobs its engine held, and something always drives them.

The successor claims the dead engine's running jobs when it first builds its engine, inside whatever task
the broker hands it first. When that task's own job is already over, the task hands the engine on (a
`drive` task on the worker's own queue) instead of returning with the claimed jobs stranded in it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from qwen_deploy.client import Client
from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until
from worker.demo_model import zen_prompts, zen_text

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "canceled", "timed_out")
PROMPT = "Beautiful is better than"


@pytest.fixture(scope="module")
def takeover(stack_factory: StackFactory) -> Stack:
    # A short lease: without a driver the stranded jobs would be claimed again (and fail) within seconds.
    s = stack_factory(  # fp32: resumed greedy texts equal an uninterrupted run exactly (see test_chaos.py)
        {"engine": {"lease_seconds": 3}, "limits": {"reap_interval": 0.5}, "model": {"dtype": "fp32"}},
        name="takeover",
    )
    s.start_worker()
    s.start_web()
    return s


def child_pid(stack: Stack, job_id: str) -> int:
    return int(stack.record(job_id)["worker"].rsplit(":", 1)[1])


def finals(client: Client, ids: list[str], timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    return [client.wait(i, timeout=max(1.0, deadline - time.monotonic())) for i in ids]


def submit_and_kill(stack: Stack, bodies: list[dict]) -> list[dict]:
    """Submit a one-token job, then `bodies`; SIGKILL the child once the first has finished and the others
    run (the successor's first message is then the finished job's); every job's final state."""
    client = stack.client()
    lead = client.submit(PROMPT, max_new_tokens=1)["id"]
    ids = [client.submit(**body)["id"] for body in bodies]

    def lead_done_rest_running() -> bool:
        return client.get(lead)["status"] == "succeeded" and all(client.get(i)["progress"]["tokens"] > 0 for i in ids)

    wait_until(lead_done_rest_running, 60, 0.005, "the first job done and the others running")
    os.kill(child_pid(stack, ids[0]), signal.SIGKILL)
    return finals(client, [lead, *ids])


def test_ten_sampled_jobs_of_a_killed_child_all_finish(takeover: Stack) -> None:
    bodies = [
        {"prompt": PROMPT, "max_new_tokens": 512, "temperature": 1.0, "seed": i, "ignore_eos": True} for i in range(10)
    ]
    lead, *done = submit_and_kill(takeover, bodies)
    assert lead["status"] == "succeeded" and lead["attempts"] == 1
    assert [d["status"] for d in done] == ["succeeded"] * 10, [d.get("error") for d in done]
    assert [d["attempts"] for d in done] == [2] * 10
    assert [d["output"]["usage"]["completion_tokens"] for d in done] == [512] * 10


def test_greedy_jobs_resumed_after_the_kill_equal_an_uninterrupted_run(takeover: Stack) -> None:
    client = takeover.client()
    bodies = [{"prompt": p, "max_new_tokens": 200, "ignore_eos": True} for p, _ in zen_prompts(zen_text())[:4]]
    reference = [d["output"]["text"] for d in finals(client, [client.submit(**b)["id"] for b in bodies])]
    _, *done = submit_and_kill(takeover, bodies)
    assert [d["status"] for d in done] == ["succeeded"] * 4, [d.get("error") for d in done]
    assert [d["attempts"] for d in done] == [2] * 4
    assert [d["output"]["text"] for d in done] == reference


def test_a_single_running_job_of_a_killed_child_finishes(takeover: Stack) -> None:
    (_, job) = submit_and_kill(takeover, [{"prompt": PROMPT, "max_new_tokens": 300, "ignore_eos": True}])
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert job["output"]["usage"]["completion_tokens"] == 300
