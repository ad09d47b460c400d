"""What the doctor's checks share, computed once: settings, Redis, where the model is, what the hub says."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import redis
import requests

from qwen_deploy.config import ConfigError, Settings, load_settings
from qwen_deploy.connections import connect

Status = Literal["pass", "warn", "fail"]
Outcome = tuple[Status, str, str]  # status, detail, fix
REDIS_TIMEOUT_S = 2.0
HUB_TIMEOUT_S = 3.0
GIB = 1024**3


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def passed(detail: str) -> Outcome:
    return "pass", detail, ""


def size(n: float) -> str:
    """Bytes as GiB or MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


class Context:
    """Settings, the Redis connection, the model's location and the hub's answer, each computed once.

    `url`: a web tier to ask (`doctor --url`); without it, the web server of the `up` running here."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url

    @cached_property
    def running_up(self) -> dict[str, Any] | None:
        """The state of the `qwen-deploy up` running here (None: none runs, or `--url` was given)."""
        from qwen_deploy.cli.up_state import read_state

        return None if self.url else read_state()

    @cached_property
    def up(self) -> dict[str, Any] | None:
        """The running `up`'s state when it is the system to check: not when the settings name another Redis."""
        state, config = self.running_up, self.config[0]
        if state and config and "redis_url" in config.model_fields_set and config.redis_url != state.get("redis_url"):
            return None
        return state

    @property
    def web_url(self) -> str:
        """The web tier the web rows ask: `--url`, else the running `up`'s (empty: none)."""
        return (self.url or str((self.up or {}).get("url") or "")).rstrip("/")

    @cached_property
    def config(self) -> tuple[Settings | None, str]:
        """The settings, with `model` the entry this host's worker serves (`worker.model`, else the first)."""
        from qwen_deploy.served import for_worker

        try:
            settings = load_settings()
            return settings.model_copy(update={"model": for_worker(settings).model}), ""
        except (ConfigError, ValueError) as exc:
            return None, str(exc)

    @property
    def settings(self) -> Settings:
        """The valid settings (the runner skips checks that need them when they are invalid)."""
        if self.config[0] is None:
            raise RuntimeError("configuration invalid")
        return self.config[0]

    @cached_property
    def redis_url(self) -> str:
        """A Redis URL set in the settings; else the Redis of the `up` running here; else the settings'
        default (or, when they are invalid, REDIS_URL or the default)."""
        config = self.config[0]
        if config and "redis_url" in config.model_fields_set:
            return config.redis_url
        if self.up and self.up.get("redis_url"):
            return str(self.up["redis_url"])
        if config:
            return config.redis_url
        return os.environ.get("REDIS_URL") or str(Settings.model_fields["redis_url"].default)

    @cached_property
    def master_name(self) -> str:
        """The Sentinel master's name (a sentinel:// URL), from the settings or the environment."""
        if self.config[0]:
            return self.config[0].redis_master_name
        default = str(Settings.model_fields["redis_master_name"].default)
        return os.environ.get("QWEN_DEPLOY_REDIS_MASTER_NAME") or default

    @cached_property
    def connection(self) -> tuple[redis.Redis | None, str]:
        try:
            client = connect(
                self.redis_url, self.master_name, socket_timeout=REDIS_TIMEOUT_S, connect_timeout=REDIS_TIMEOUT_S
            )
            client.ping()
            return client, ""
        except (redis.RedisError, OSError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    @property
    def redis(self) -> redis.Redis:
        client, error = self.connection
        if client is None:
            raise RuntimeError(error)
        return client

    @cached_property
    def model(self) -> tuple[str, Path | None]:
        """("local" | "cache" | "hub", the directory with the model files when there is one)."""
        name, revision = self.settings.model.name_or_path, self.settings.model.revision
        path = Path(name).expanduser()
        if path.is_dir() or name.startswith(("/", ".", "~")):
            return "local", path
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
        return ("cache", Path(found).parent) if isinstance(found, str) else ("hub", None)

    @cached_property
    def hub(self) -> tuple[int | None, dict[str, Any], str]:
        """(HTTP status, model info, error) from the hub API for the configured model."""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return None, {}, "HF_HUB_OFFLINE is set"
        model, token = self.settings.model, self.settings.hf_token
        url = f"{constants.ENDPOINT}/api/models/{model.name_or_path}"
        url += f"/revision/{model.revision}" if model.revision else ""
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        try:
            resp = requests.get(url, headers=headers, timeout=HUB_TIMEOUT_S)
            info = resp.json() if resp.ok else {}
        except requests.RequestException as exc:
            return None, {}, f"hub unreachable: {type(exc).__name__}"
        except ValueError:
            info = {}
        return resp.status_code, info if isinstance(info, dict) else {}, ""
