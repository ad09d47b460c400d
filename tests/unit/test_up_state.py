"""`up`'s state file: written private, read while its `up` runs, ignored when stale, removed by its owner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_deploy.cli.up_state import read_state, remove_state, write_state


def test_state_is_private_read_back_and_removed_by_its_writer(tmp_path: Path) -> None:
    path = write_state(
        "http://127.0.0.1:8000", "redis://:pw@127.0.0.1:6390/0", {"web": 11}, ["demo"], tmp_path / "up.json"
    )
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the Redis password
    state = read_state(path)
    assert state is not None
    assert (state["url"], state["redis_url"], state["models"]) == (
        "http://127.0.0.1:8000",
        "redis://:pw@127.0.0.1:6390/0",
        ["demo"],
    )
    assert state["pids"] == {"up": os.getpid(), "web": 11} and state["started_at"] > 0
    assert list(tmp_path.iterdir()) == [path]  # no partial file left
    remove_state(path)
    assert not path.exists() and read_state(path) is None


def test_a_stale_or_foreign_state_is_ignored_and_kept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "up.json"
    path.write_text(json.dumps({"url": "http://x", "pids": {"up": int(gone.stdout)}}))
    assert read_state(path) is None  # its `up` is no longer running
    remove_state(path)
    assert path.exists()  # another process's file: not this one's to remove
    path.write_text("{not json")
    assert read_state(path) is None


def test_doctor_takes_a_configured_redis_over_the_running_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_deploy.cli.doctor.context import Context

    write_state("http://127.0.0.1:8000", "redis://:pw@127.0.0.1:6390/0", {}, ["demo"], tmp_path / "up.json")
    monkeypatch.setenv("QWEN_DEPLOY_CACHE", str(tmp_path))
    monkeypatch.setenv("QWEN_DEPLOY_ENV_FILE", str(tmp_path / "none.env"))
    (tmp_path / "config.yml").write_text("log_level: INFO\n")
    monkeypatch.setenv("QWEN_DEPLOY_CONFIG", str(tmp_path / "config.yml"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    ctx = Context()
    assert ctx.up is not None and ctx.redis_url == "redis://:pw@127.0.0.1:6390/0"
    assert ctx.web_url == "http://127.0.0.1:8000"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6399/0")  # set in the settings: that system is checked
    ctx = Context()
    assert ctx.running_up is not None and ctx.up is None and ctx.web_url == ""
    assert ctx.redis_url == "redis://127.0.0.1:6399/0"
    assert Context("http://10.0.0.5:8000").up is None  # --url: the web tier asked, not this host's up
