"""Checks of this host and its configuration: Python, packages, config, disk, API keys."""

from __future__ import annotations

import ipaddress
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from qwen_deploy.cli.doctor.context import GIB, Context, Outcome, passed, size
from qwen_deploy.config import default_cache_dir

MIN_PYTHON = (3, 11)
PROJECT = "qwen-deploy"
KEY_PACKAGES = ("torch", "transformers", "celery", "kombu", "redis", "flask")
DISK_WARN_BYTES = 5 * GIB
DISK_FAIL_BYTES = 500 * 1024**2


def check_python(ctx: Context) -> Outcome:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info >= MIN_PYTHON:
        return passed(version)
    return "fail", f"{version} < {'.'.join(map(str, MIN_PYTHON))}", "use Python 3.11 or newer"


def _specifiers() -> dict[str, Any]:
    """The project's own version specifiers by package name (empty when it is not installed)."""
    try:
        from packaging.requirements import Requirement

        return {(r := Requirement(line)).name.lower(): r.specifier for line in metadata.requires(PROJECT) or []}
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return {}


def check_packages(ctx: Context) -> Outcome:
    specs, found, problems = _specifiers(), [], []
    for name in KEY_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} missing")
            continue
        found.append(f"{name} {version}")
        if name in specs and not specs[name].contains(version, prereleases=True):
            problems.append(f"{name} {version} does not satisfy {specs[name]}")
    if problems:
        return "fail", "; ".join(problems), "uv sync (or pip install -r requirements.txt)"
    return passed(", ".join(found))


def check_config(ctx: Context) -> Outcome:
    settings, error = ctx.config
    if settings is None:
        return "fail", error, "fix that key in config.yml, .env or the environment"
    return passed(f"valid; model {settings.model.name_or_path}")


def loopback(host: str) -> bool:
    """Whether a bind address is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api_keys(ctx: Context) -> Outcome:
    web = ctx.settings.web
    keys = f"{len(web.api_keys)} API key(s)"
    if web.api_keys:
        return passed(f"{keys}; bind {web.host}")
    if loopback(web.host):
        return passed(f"no API keys; bind {web.host} (this host only)")
    return (
        "fail",
        f"no API keys while binding {web.host}: anyone who can reach it can use the service",
        "set web.api_keys (QWEN_DEPLOY_WEB__API_KEYS) or bind web.host to 127.0.0.1",
    )


def check_disk(ctx: Context) -> Outcome:
    from huggingface_hub import constants

    free_by_path = {}
    for path in (default_cache_dir(), Path(constants.HF_HUB_CACHE)):
        existing = next(p for p in (path, *path.parents) if p.exists())
        free_by_path[path] = shutil.disk_usage(existing).free
    path = min(free_by_path, key=free_by_path.__getitem__)
    detail, fix = f"{size(free_by_path[path])} free for {path}", "free space or move HF_HOME / QWEN_DEPLOY_CACHE"
    if free_by_path[path] < DISK_FAIL_BYTES:
        return "fail", detail, fix
    return ("warn", detail, fix) if free_by_path[path] < DISK_WARN_BYTES else passed(detail)
