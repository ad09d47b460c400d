"""The analyzer template through a deployment: in-process and through the queue give the same records;
`analyze` resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analysis import LocalRunner, QueueRunner, run_analysis
from analysis.records import done_keys
from qwen_deploy.config import load_settings
from tests.helpers import ROOT, Stack
from tests.unit.test_analysis import ZenAnalyzer

ZEN_STARTS = [
    "Beautiful is better than",
    "Errors should never",
    "Now is better than",
    "Simple is better than",
    "Flat is better than",
    "Readability",
    "Explicit is better than",
    "Sparse is better than",
]


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": f"z{i}", "text": ZEN_STARTS[i % len(ZEN_STARTS)]} for i in range(n)]


@pytest.fixture(scope="module")
def handler(demo_model: Path):  # type: ignore[no-untyped-def]
    from worker.handler import ModelHandler

    h = ModelHandler(load_settings(environ={}, overrides={"model": {"name_or_path": str(demo_model), "threads": 1}}))
    h.setup()
    return h


def test_in_process_and_queue_give_the_same_records(stack: Stack, handler) -> None:  # type: ignore[no-untyped-def]
    analyzer = ZenAnalyzer()
    local = list(run_analysis(analyzer, records(20), LocalRunner(handler, batch_size=8), set(), chunk=7))
    queued = list(run_analysis(analyzer, records(20), QueueRunner(stack.client()), set(), chunk=7))
    assert local == queued
    assert [line["key"] for line in local] == [f"z{i}" for i in range(20)]
    assert local[0]["result"] == {"next": "ugly."} and local[1]["result"] == {"next": "pass"}


def test_analyze_cli_resumes_without_redoing_records(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records(12)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "QWEN_DEPLOY_ENV_FILE": str(tmp_path / "none.env")}
    cmd = [
        sys.executable,
        "-m",
        "qwen_deploy.cli",
        "analyze",
        str(source),
        "--out",
        str(out),
        "--url",
        stack.url,
        "--analyzer",
        "tests.unit.test_analysis:ZenAnalyzer",
        "--chunk",
        "4",
    ]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    full = out.read_text().splitlines()
    assert len(full) == 12 and "0 already done, 12 analysed" in first.stderr
    out.write_text("\n".join(full[:5]) + "\n" + full[5][:20])  # interrupted mid-write
    assert done_keys(out) == {f"z{i}" for i in range(5)}
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "5 already done, 7 analysed" in second.stderr
    resumed = [json.loads(x) for x in out.read_text().splitlines()]
    assert resumed == [json.loads(x) for x in full]
