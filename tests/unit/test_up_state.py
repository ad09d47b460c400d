"""`up`'s state file: written private, read while its `up` runs, ignored when stale, removed by its owner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
