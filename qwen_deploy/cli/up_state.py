"""Where a running `up` is: a state file in its data directory (`up.json`), written once its processes
are started and removed when it stops, so that `doctor` checks the system `up` started (its Redis, its
web server) rather than the defaults.

The file holds the embedded Redis's URL with its password: it is written private (0600), like the AOF
next to it. A file whose `up` process is gone (killed before it could remove it) is stale and ignored.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from qwen_deploy.config import default_cache_dir

STATE_FILE = "up.json"


def state_path() -> Path:
    return default_cache_dir() / STATE_FILE


def alive(pid: Any) -> bool:
    """Whether a process with this id runs (and is visible to this user)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def write_state(url: str, redis_url: str, pids: dict[str, int], models: list[str], path: Path | None = None) -> Path:
    """Record a started `up`: its web URL, Redis URL, process ids (`up` itself first), models and start time."""
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "url": url,
        "redis_url": redis_url,
        "pids": {"up": os.getpid(), **pids},
        "models": models,
        "started_at": time.time(),
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(state, out, indent=2)
    partial.replace(path)  # readers see the whole file or none
    return path


def read_state(path: Path | None = None) -> dict[str, Any] | None:
    """The state of the `up` that runs now, or None (no file, an unreadable one, or a stale one)."""
    try:
        state = json.loads((path or state_path()).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pids"), dict):
        return None
    return state if alive(state["pids"].get("up")) else None


def remove_state(path: Path | None = None) -> None:
    """Remove the state file if it is this process's (a second `up` that failed leaves the first one's)."""
    path = path or state_path()
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(state, dict) and (state.get("pids") or {}).get("up") == os.getpid():
        path.unlink(missing_ok=True)
