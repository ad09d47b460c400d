"""A job that reaches its generation time budget ends timed_out with its partial text."""

from __future__ import annotations

import json

import pytest

from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_limits(stack_factory: StackFactory) -> Stack:
    limits = {"generation_budget": 0.25, "soft_time_limit": 10, "hard_time_limit": 12}
    s = stack_factory({"limits": limits}, name="budget")
    s.start_worker()
    s.start_web()
    return s


def test_time_budget_gives_timed_out_with_partial_text(small_limits: Stack) -> None:
    client = small_limits.client()
    pid = small_limits.child_pid()
    job = client.generate(
        "Simple is better than complex. " * 400 + "Beautiful is better than", max_new_tokens=512, ignore_eos=True
    )
    assert job["status"] == "timed_out"
    assert job["output"]["finish_reason"] == "time_limit"
    assert job["error"]["code"] == "time_limit"
    assert 0 < job["output"]["usage"]["completion_tokens"] < 512
    assert job["output"]["text"]
    # The next job runs in the same child: no reload.
    after = client.generate("Errors should never", max_new_tokens=6)
    assert after["status"] == "succeeded" and after["output"]["text"].startswith(" pass silently.")
    assert small_limits.child_pid() == pid
    assert small_limits.model_loads() == 1


def test_a_micro_batch_that_times_out_marks_only_its_own_lines(small_limits: Stack) -> None:
    import requests

    long = {"prompt": "Beautiful is better than", "max_new_tokens": 512, "ignore_eos": True}
    short = {"prompt": "Errors should never", "max_new_tokens": 6}
    size = small_limits.settings.batches.micro_batch_size
    lines = [{"custom_id": f"l{i}", "body": long} for i in range(size)]
    lines += [{"custom_id": f"s{i}", "body": short} for i in range(size)]
    created = requests.post(small_limits.url + "/v1/batches", json={"requests": lines}, timeout=30).json()
    url = f"{small_limits.url}/v1/batches/{created['id']}"
    final = wait_until(lambda: (b := requests.get(url, timeout=5).json())["status"] == "completed" and b, 60)
    assert final["request_counts"] == {"total": 2 * size, "completed": size, "failed": size}
    out = [json.loads(x) for x in requests.get(url + "/results", timeout=5).text.splitlines()]
    for line in out:
        if line["custom_id"].startswith("l"):
            assert line["error"]["code"] == "timed_out"
            assert line["response"]["body"]["output"]["finish_reason"] == "time_limit"
            assert 0 < line["response"]["body"]["output"]["usage"]["completion_tokens"] < 512
        else:
            assert line["error"] is None
            assert line["response"]["body"]["output"]["text"].startswith(" pass silently.")
