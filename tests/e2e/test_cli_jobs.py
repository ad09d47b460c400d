"""The job commands as a user runs them against a running service: generate (JSON, stream, chat), jobs,
status, watch, cancel, batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import StackFactory
from tests.helpers import ROOT, Stack


def cli(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QWEN_DEPLOY_ENV_FILE": os.devnull}
    return subprocess.run(
        [sys.executable, "-m", "qwen_deploy.cli", *argv, "--url", stack.url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_json_stream_chat_then_jobs_and_status(stack: Stack) -> None:
    out = cli(stack, "generate", "Beautiful is better than", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded" and job["output"]["text"].startswith(" ugly.")
    streamed = cli(stack, "generate", "Beautiful is better than", "--max-new-tokens", "4", "--stream")
    assert streamed.returncode == 0 and streamed.stdout == job["output"]["text"] + "\n", streamed.stderr
    chat = cli(stack, "generate", "Beautiful is better than", "--chat", "--system", "Zen", "--json")
    assert chat.returncode == 0 and json.loads(chat.stdout)["status"] == "succeeded", chat.stderr
    listed = cli(stack, "jobs", "--status", "succeeded", "--limit", "100")
    assert listed.returncode == 0 and job["id"] in listed.stdout
    status = cli(stack, "status", job["id"])
    assert status.returncode == 0 and json.loads(status.stdout)["output"]["text"] == job["output"]["text"]


def test_cancel_then_watch_says_canceled(stack_factory: StackFactory) -> None:
    """On a stack with no worker the job stays queued, so the cancel always finds it unfinished."""
    idle = stack_factory(name="no-worker")
    idle.start_web()
    job = idle.client().submit("Beautiful is", max_new_tokens=8)
    out = cli(idle, "cancel", job["id"])
    assert out.returncode == 0 and out.stdout.split() == [job["id"], "canceled"], out.stderr
    watched = cli(idle, "watch", job["id"])
    assert watched.returncode == 1 and f"job {job['id']} canceled" in watched.stderr


def test_batch_file_writes_every_result_line(stack: Stack, tmp_path: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    bodies = [
        {"custom_id": f"r{i}", "body": {"prompt": "Beautiful is better than", "max_new_tokens": 4}} for i in range(3)
    ]
    lines.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    out = cli(stack, "batch", str(lines), "--poll", "0.2")
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in (tmp_path / "lines.results.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["r0", "r1", "r2"]
    assert "completed" in out.stderr


def test_analyze_warns_about_records_without_text_and_about_the_demo_model(stack: Stack, tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"id": 1, "text": "I loved it"}\n{"id": 2, "body": "no text field"}\n')
    run = cli(stack, "analyze", str(source), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "warning: 1 of 2 records lack `text`" in run.stderr
    assert "the demo model only knows the Zen of Python" in run.stderr
    assert sorted(json.loads(line)["key"] for line in out.read_text().splitlines()) == ["1", "2"]
    source.write_text('{"id": 1, "text": "fine"}\n[1, 2]\n')
    bad = cli(stack, "analyze", str(source), "--out", str(out))
    assert bad.returncode == 1 and f"qwen-deploy: {source}:2: each line must be a JSON object" in bad.stderr
