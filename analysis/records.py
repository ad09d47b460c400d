"""Reading input records (JSONL or CSV) and the keys already in a results file (for resume)."""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from analysis.base import Analyzer


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records from a .csv file (header row) or a JSONL file (one object per line)."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)
        return
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object")
                yield record


def count_records(path: Path, required: tuple[str, ...] = ()) -> tuple[int, int]:
    """How many records the file holds, and how many of them lack one of the `required` fields."""
    total = missing = 0
    for record in read_records(path):
        total += 1
        missing += any(name not in record for name in required)
    return total, missing


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that an interrupted run left without its newline, so appends stay valid JSONL."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        data = fh.read()
        if not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def done_keys(path: Path) -> set[str]:
    """Keys of the finished lines of an earlier run (after dropping a torn last line)."""
    if not path.exists():
        return set()
    drop_torn_tail(path)
    keys = set()
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                keys.add(str(json.loads(line)["key"]))
            except (ValueError, KeyError, TypeError):
                continue
    return keys


def load_analyzer(spec: str) -> Analyzer:
    """An analyzer instance from "package.module:ClassName"."""
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name or "Analyzer")
    if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
        raise TypeError(f"{spec} is not an Analyzer subclass")
    return cls()
