"""A model that cannot load (a misspelled local directory; a hub id without hub access fails the same way):
/readyz says so with the reason, the model's jobs fail with model_load_failed instead of staying queued, and
`up` reports it plainly and exits non-zero. HF_HUB_OFFLINE=1: nothing here ever reaches the hub."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from qwen_deploy.cli.redis_server import free_port
from tests.conftest import StackFactory
from tests.e2e.test_cli import up_env
from tests.helpers import ROOT, group_alive, wait_until

pytestmark = pytest.mark.slow

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def readyz(url: str, **params: str) -> requests.Response:
    return requests.get(url + "/readyz", params=params, timeout=10)


def test_jobs_of_a_model_that_cannot_load_fail_and_readyz_says_why(stack_factory: StackFactory, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    stack = stack_factory(model=missing, env=OFFLINE, name="noload")
    stack.start_web()
    client = stack.client()
    waiting = client.submit("Beautiful is better than", max_new_tokens=4)["id"]  # queued before any worker
    stack.start_worker(wait=False)

    def failed_readyz() -> tuple[int, dict] | None:  # (a 503 Response is falsy)
        answer = readyz(stack.url)
        error = answer.json().get("error") or {}
        return (answer.status_code, error) if error.get("code") == "model_load_failed" else None

    status, error = wait_until(failed_readyz, 90, 0.2, "/readyz to report the failed load")
    assert status == 503 and str(missing) in error["message"]
    per_model = readyz(stack.url, model=missing.name)
    assert (per_model.status_code, per_model.json()["error"]["code"]) == (503, "model_load_failed")
    after = client.submit("Errors should never", max_new_tokens=4)["id"]
    for job_id in (waiting, after):
        job = client.wait(job_id, timeout=60)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "model_load_failed" and str(missing) in job["error"]["message"]
    assert stack.worker is not None and stack.worker.poll() is None  # the worker stays up and says why
    assert "could not be loaded" in stack.log_path.read_text()


def test_up_with_a_model_that_cannot_load_says_so_and_exits(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    env = {
        **up_env(tmp_path, **OFFLINE),
        "QWEN_DEPLOY_CACHE": str(tmp_path / "cache"),
        "QWEN_DEPLOY_WEB__WORKERS": "1",
        "QWEN_DEPLOY_MODEL__THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_deploy.cli", "up", "--model", str(missing), "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"up kept running: {out.decode(errors='replace')[-3000:]}") from None
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text[-3000:]
    assert f"the model '{missing}' could not be loaded" in text
    assert "qwen-deploy download" in text and "local directory" in text
    assert "no model could be loaded; stopping" in text
    wait_until(lambda: not group_alive(proc.pid), 30, 0.2, "every process started by up to exit")
