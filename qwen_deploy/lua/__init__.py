"""The Redis state transitions as Lua files, read once per process.

A script that starts with ``--#include common`` gets ``common.lua`` (the helpers shared by the job
scripts) in its place. ``--[[BUCKETS]]`` is replaced by the histogram bucket bounds and
``--[[DEADLINE_EXCEEDED]]`` by the error a job closed at its deadline carries (a Lua string of its JSON:
the object the workers write too, from `qwen_deploy.states`).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from qwen_deploy.states import DEADLINE_EXCEEDED

KEPT_REQUEST_BYTES = 64 * 1024 * 1024  # the requests of one owner's ended jobs kept for retry (common.lua)
HISTOGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


@functools.cache
def script(name: str) -> str:
    """The text of ``{name}.lua`` with its includes resolved."""
    text = resources.files(__package__).joinpath(f"{name}.lua").read_text()
    lines = [
        script(line.removeprefix("--#include ").strip()) if line.startswith("--#include ") else line
        for line in text.splitlines()
    ]
    buckets = ", ".join(f"'{b}'" for b in HISTOGRAM_BUCKETS)
    text = "\n".join(lines).replace("--[[BUCKETS]]", buckets)
    text = text.replace("--[[DEADLINE_EXCEEDED]]", f"[==[{json.dumps(DEADLINE_EXCEEDED)}]==]")
    return text.replace("--[[KEPT_REQUEST_BYTES]]", str(KEPT_REQUEST_BYTES)) + "\n"
