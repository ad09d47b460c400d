"""What every command shares: settings that exit cleanly when invalid, the API client, progress lines."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from qwen_deploy.cli.errors import mark_progress, normalize_url
from qwen_deploy.client import Client
from qwen_deploy.config import ConfigError, Settings, load_settings


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings (of `environ` when given), or exit naming the bad key."""
    try:
        return load_settings(environ=dict(environ) if environ is not None else None)
    except ConfigError as exc:
        sys.exit(f"qwen-deploy: {exc}")


def client(url: str | None) -> Client:
    """An API client for `url`, or for this host's configured web address, with the configured key."""
    config = settings()
    return Client(
        normalize_url(url) if url else f"http://{config.web.host}:{config.web.port}", api_key=config.client_key
    )


def print_progress(progress: Mapping[str, object]) -> None:
    """One overwritten status line on stderr."""
    mark_progress()
    parts = [f"{k}={v}" for k, v in progress.items()]
    print("\r" + " ".join(parts)[:150].ljust(150), end="", file=sys.stderr, flush=True)


def redacted(url: str) -> str:
    """The URL with its password replaced by *** (each part of a `sentinel://…;sentinel://…` URL)."""
    if ";" in url:
        return ";".join(redacted(part) for part in url.split(";"))
    head, sep, tail = url.rpartition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{tail}"


def child_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`: what the children of a command get."""
    return {**os.environ, **extra}


MODEL_ENV = "QWEN_DEPLOY_MODEL__NAME_OR_PATH"


def demo_env() -> dict[str, str]:
    """Build (or reuse) the demo model; the environment that points a child process at it."""
    from worker.demo_model import build_demo_model

    path = build_demo_model(log=lambda msg: print(f"demo-model: {msg}", file=sys.stderr))
    return {MODEL_ENV: str(path)}
