"""The hard time limit: a job stuck in one long C call is killed with its child, ends timed_out, is never
re-run, and the replacement child serves the next job (no "Timed out waiting for UP message" loop)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """A random one-layer Qwen2 with 4096-wide matrices and the demo tokenizer: on an 8,000-token prompt
    its first projection is a single C call of about a second, which the soft limit cannot interrupt."""
    from worker.random_model import build_random_qwen2

    out = tmp_path_factory.mktemp("wide") / "model"
    build_random_qwen2(
        demo_model, out, hidden=4096, intermediate=4096, layers=1, heads=32, kv_heads=8, max_positions=16384
    )
    return out


@pytest.fixture(scope="module")
def hard(stack_factory: StackFactory, wide_model: Path) -> Stack:
    config = {
        "limits": {"generation_budget": 0.1, "soft_time_limit": 0.5, "hard_time_limit": 0.8},
        "generation": {"max_prompt_tokens": 8192},
    }
    s = stack_factory(config, model=wide_model, name="hard")
    s.start_worker()
    s.start_web()
    return s


def test_hard_limit_kills_the_child_marks_timed_out_and_never_reruns(
    hard: Stack, record_property: Callable[[str, object], None]
) -> None:
    client = hard.client()
    pid = hard.child_pid()
    job = client.submit("Simple is better than complex. " * 1200, max_new_tokens=4)  # > 8,192 tokens
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "timed_out", done
    assert done["error"]["code"] == "hard_time_limit"
    assert done["attempts"] == 1
    new_pid = wait_until(lambda: (p := hard.child_pid()) != pid and p, 60, 0.1, "a new child")
    after = client.generate("Beautiful is better than", max_new_tokens=1)
    assert after["status"] == "succeeded" and after["output"]["usage"]["completion_tokens"] == 1
    assert hard.record(job["id"])["deliveries"] == "1"  # not re-run
    log = hard.log_path.read_text()
    assert "Hard time limit (0.8s) exceeded" in log
    assert "Timed out waiting for UP message" not in log
    figures = {"jobs": 1, "timed_out": 1, "reruns": 0, "new_child": new_pid != pid, "up_kills": 0}
    record_property("reliability:hard_time_limit", json.dumps(figures))  # for bench/reliability_bench.py
