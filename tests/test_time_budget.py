"""A job that reaches its generation time budget ends timed_out with its partial text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_limits(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    limits = {"generation_budget": 0.25, "soft_time_limit": 10, "hard_time_limit": 12}
    s = Stack(tmp_path_factory.mktemp("budget"), demo_model, {"limits": limits})
    s.start_worker()
    s.start_web()
    yield s
    s.stop()


def test_time_budget_gives_timed_out_with_partial_text(small_limits: Stack) -> None:
    client = small_limits.client()
    pid = small_limits.child_pid()
    job = client.generate("Simple is better than complex. " * 400 + "Beautiful is better than",
                          max_new_tokens=512, ignore_eos=True)
    assert job["status"] == "timed_out"
    assert job["output"]["finish_reason"] == "time_limit"
    assert job["error"]["code"] == "time_limit"
    assert 0 < job["output"]["usage"]["completion_tokens"] < 512
    assert job["output"]["text"]
    assert job["completed_at"] - job["started_at"] < 5
    # The next job runs in the same child: no reload.
    after = client.generate("Errors should never", max_new_tokens=6)
    assert after["status"] == "succeeded" and after["output"]["text"].startswith(" pass silently.")
    assert small_limits.child_pid() == pid
    assert small_limits.model_loads() == 1
