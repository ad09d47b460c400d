"""Paths from HTTP requests: relative to a configured root, never escaping it (`..`, absolute, symlinks)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from qwen_deploy.errors import Unprocessable


def confine(root: Path, relative: str, param: str, must_exist: bool = False) -> Path:
    """`root / relative`, resolved; 422 when it is absolute, climbs out, or links out of `root`."""
    if len(relative) > 1024 or any(ord(c) < 32 or ord(c) == 127 for c in relative):
        raise Unprocessable(
            f"{param} must be a path of up to 1024 characters without control characters",
            code="invalid_path",
            param=param,
        )
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or relative.startswith("~") or ".." in pure.parts or "\\" in relative:
        raise Unprocessable(
            f"{param} must be a relative path inside its root, without '..'", code="path_outside_root", param=param
        )
    base = root.expanduser().resolve()
    target = (base / pure).resolve()
    if not target.is_relative_to(base):
        raise Unprocessable(
            f"{param} leads outside its root (through a symlink)", code="path_outside_root", param=param
        )
    if must_exist and not target.exists():
        raise Unprocessable(f"{param} does not exist: {relative}", code="path_not_found", param=param)
    return target
