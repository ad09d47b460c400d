"""Typed settings: built-in defaults, then `config.yml`, then `.env`, then the environment.

Every key can be overridden from the environment as ``QWEN_DEPLOY_<SECTION>__<KEY>``
(e.g. ``QWEN_DEPLOY_LIMITS__HARD_TIME_LIMIT=30``). ``HF_TOKEN``, ``PORT`` and ``REDIS_URL``
are read under their usual names. This module imports no heavy dependencies.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, model_validator

# Sections are re-exported: callers import them from here.
from qwen_deploy.sections import (  # noqa: F401
    ALIAS_PATTERN,
    CACHE_ENV,
    BatchSettings,
    EngineSettings,
    FileSettings,
    GenerationSettings,
    LimitSettings,
    ModelEntry,
    ModelSettings,
    PathSettings,
    Section,
    WebhookSettings,
    WebSettings,
    WorkerSettings,
    default_cache_dir,
)

ENV_PREFIX = "QWEN_DEPLOY_"
CONFIG_ENV = "QWEN_DEPLOY_CONFIG"
ENV_FILE_ENV = "QWEN_DEPLOY_ENV_FILE"
# Variables with the prefix that are not settings keys.
RESERVED_ENV = frozenset({CONFIG_ENV, ENV_FILE_ENV, CACHE_ENV})
# Plain names read as such, mapped to their place in the settings tree.
PLAIN_ENV = {"HF_TOKEN": ("hf_token",), "PORT": ("web", "port"), "REDIS_URL": ("redis_url",)}


class Settings(Section):
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_master_name: str = Field(
        "mymaster", min_length=1, description="the Sentinel master's name, for a sentinel:// redis_url"
    )
    redis_wait_replicas: int | None = Field(
        None,
        ge=0,
        description=(
            "WAIT for this many replicas after a submit (0: no WAIT); default 1 for a sentinel:// URL, else 0"
        ),
    )
    redis_wait_ms: int = Field(100, ge=1, description="the WAIT's timeout in milliseconds")
    hf_token: SecretStr | None = None
    key_prefix: str = "qd"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    model: ModelSettings = Field(default_factory=ModelSettings)
    models: list[ModelEntry] = Field(default_factory=list, description="several models; the first is the default")
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    files: FileSettings = Field(default_factory=FileSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

    @model_validator(mode="after")
    def _check_order(self) -> Settings:
        lim, gen = self.limits, self.generation
        if not lim.generation_budget < lim.soft_time_limit < lim.hard_time_limit:
            raise ValueError(
                "limits: need generation_budget < soft_time_limit < hard_time_limit, got "
                f"{lim.generation_budget} < {lim.soft_time_limit} < {lim.hard_time_limit}"
            )
        if gen.default_max_new_tokens > gen.max_new_tokens_cap:
            raise ValueError("generation.default_max_new_tokens exceeds generation.max_new_tokens_cap")
        if self.models:
            if "model" in self.model_fields_set:
                raise ValueError("give either `model` (one model) or `models` (a list), not both")
            aliases = [m.alias for m in self.models]
            if len(set(aliases)) != len(aliases):
                raise ValueError(f"models: aliases must be unique, got {', '.join(aliases)}")
            clash = set(aliases[1:]) & set(self.web.model_aliases)
            if clash:
                raise ValueError(f"web.model_aliases names the alias of another model: {', '.join(sorted(clash))}")
            self.model = ModelSettings(**self.models[0].model_dump(exclude={"alias"}))  # the default's settings
            self.model_fields_set.discard("model")
        entries: list[ModelSettings] = [*self.models] if self.models else [self.model]
        adapters = [a for m in entries for a in m.adapters]
        taken = {*(m.alias for m in self.models), *self.web.model_aliases}
        if len(set(adapters)) != len(adapters) or taken & set(adapters):
            raise ValueError("adapter names must be unique and differ from model aliases and web.model_aliases")
        return self

    @property
    def token(self) -> str | None:
        """The HF token's value, for the hub client only (never log or return it)."""
        return self.hf_token.get_secret_value() if self.hf_token else None

    @property
    def client_key(self) -> str | None:
        """The first admin key, else the first API key: what this host's own CLI sends."""
        keys = self.web.admin_keys or self.web.api_keys  # the admin key, so `download --queue` works
        return keys[0].get_secret_value() if keys else None

    @property
    def wait_replicas(self) -> int:
        """Replicas a submit waits for (WAIT): the setting, else 1 behind Sentinel and 0 for a lone Redis."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_url.strip().lower().startswith("sentinel://") else 0

    @property
    def visibility_timeout(self) -> int:
        """Broker redelivery delay: longer than the longest task of any queue."""
        return int(max(self.limits.hard_time_limit, self.limits.convert_time_limit) + 300)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _env_tree(env: dict[str, str]) -> dict[str, Any]:
    """Turn ``QWEN_DEPLOY_A__B=v`` and the plain names into a nested mapping."""
    tree: dict[str, Any] = {}
    for name, path in PLAIN_ENV.items():
        if env.get(name):
            _set_path(tree, path, env[name])
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        path = tuple(p.lower() for p in name.removeprefix(ENV_PREFIX).split("__"))
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:  # its text quotes the input, which may hold keys: give the place only
                mark = getattr(exc, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                raise ConfigError(f"invalid configuration: {name} is not valid JSON/YAML{where}") from None
        _set_path(tree, path, value)
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:  # not the error text: it quotes the file, which may hold keys
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', '')}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _format_error(exc: ValidationError) -> str:
    """One line per error, naming the key; never the input value (it may be a secret)."""
    lines = []
    for err in exc.errors(include_input=False, include_context=False, include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        env = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"])
        lines.append(f"  {key}: {err['msg']} (config.yml key {key!r} or env {env})")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the settings; raise ConfigError naming the bad key."""
    environ = dict(os.environ if environ is None else environ)
    path = Path(config_file or environ.get(CONFIG_ENV) or "config.yml")
    data: dict[str, Any] = {}
    if path.is_file():
        data = _read_yaml(path)
    elif config_file or environ.get(CONFIG_ENV):
        raise ConfigError(f"config file not found: {path}")
    env_file = Path(environ.get(ENV_FILE_ENV, ".env"))
    dotenv = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file.is_file() else {}
    data = _deep_merge(data, _env_tree(dotenv))
    data = _deep_merge(data, _env_tree(environ))
    data = _deep_merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, loaded once."""
    return load_settings()
