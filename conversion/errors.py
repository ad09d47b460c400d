"""The exceptions the conversion package raises on purpose: one root, ``ConversionError``, with a ``code``."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any


class ConversionError(Exception):
    """A download or export that cannot be done; ``message`` is meant for the user as is, ``code`` names why."""

    def __init__(self, message: str, code: str = "conversion_failed") -> None:
        super().__init__(message, code)  # all arguments: survives pickling and Celery's JSON
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class DownloadError(ConversionError):
    """A download that failed; ``permanent`` says whether retrying later can help."""

    def __init__(self, message: str, code: str, permanent: bool) -> None:
        Exception.__init__(self, message, code, permanent)  # all arguments: survives pickling
        self.message = message
        self.code = code
        self.permanent = permanent


def inside(root: Path, name: Any, source: Path) -> Path:
    """`root / name` for a name that a checkpoint file (`source`) gives, when it stays inside `root`: a
    relative path without `..`, NUL or backslashes (judged by its text: a shard may be a symlink into a
    hub cache's blobs); ConversionError `unsafe_path` otherwise."""
    if (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or "\\" in name
        or PurePosixPath(name).is_absolute()
        or ".." in PurePosixPath(name).parts
    ):
        raise ConversionError(
            f"{source} names {name!r}, which is not a file inside {root}; refusing to read outside the checkpoint",
            "unsafe_path",
        )
    return root / name
