"""A crash-safe build cache for model directories: one builder at a time (``flock``), the build goes to a
scratch directory, a marker file is written last, and the finished directory is moved into place.

A directory without a matching marker, or a scratch directory left by a killed build, is never reused."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

MARKER = ".complete"

Log = Callable[[str], Any]
Build = Callable[[Path], Mapping[str, Any] | None]


def is_complete(path: Path, stamp: Mapping[str, Any]) -> bool:
    """Whether ``path`` holds a finished build whose marker records ``stamp``."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in stamp.items())


@contextlib.contextmanager
def locked(parent: Path, kind: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<parent>/.<kind>.lock``; remove scratch folders of crashed builds."""
    with open(parent / f".{kind}.lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            # Builders only make scratch folders under the lock: any left are from a crash.
            for stale in parent.glob(f".{kind}-*-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publishable(path: Path) -> None:
    """mkdtemp makes the scratch folder private; a model is not secret."""
    path.chmod(0o755)
    for item in path.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)


def _install(tmp: Path, out: Path, kind: str) -> None:
    """Move the finished ``tmp`` into ``out``, replacing whatever was there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{kind}-old-"))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cached_build(
    out: Path,
    build: Build,
    *,
    kind: str,
    stamp: Mapping[str, Any],
    force: bool = False,
    log: Log = print,
    label: str | None = None,
) -> Path:
    """``out``, built by ``build(scratch_dir)`` unless it already holds a finished build recording ``stamp``.

    ``build`` may return facts to record in the marker. Concurrent callers build once: the others wait for
    the lock and then find the marker."""
    label = label or kind
    if not force and is_complete(out, stamp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out.parent, kind):
        if not force and is_complete(out, stamp):
            log(f"{label}: built by another process at {out}")
            return out
        log(f"{label}: building into {out}")
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{kind}-tmp-"))
        try:
            facts = build(tmp) or {}
            _publishable(tmp)
            (tmp / MARKER).write_text(json.dumps({**facts, **stamp}) + "\n")
            _install(tmp, out, kind)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
