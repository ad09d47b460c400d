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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

ENV_PREFIX = "QWEN_DEPLOY_"
CONFIG_ENV = "QWEN_DEPLOY_CONFIG"
ENV_FILE_ENV = "QWEN_DEPLOY_ENV_FILE"
CACHE_ENV = "QWEN_DEPLOY_CACHE"
# Variables with the prefix that are not settings keys.
RESERVED_ENV = frozenset({CONFIG_ENV, ENV_FILE_ENV, CACHE_ENV})
# Plain names read as such, mapped to their place in the settings tree.
PLAIN_ENV = {"HF_TOKEN": ("hf_token",), "PORT": ("web", "port"), "REDIS_URL": ("redis_url",)}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    revision: str | None = None
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    threads: int = Field(0, ge=0, description="torch threads in the worker child; 0 = cores - 1")
    trust_remote_code: bool = False


class GenerationSettings(Section):
    max_new_tokens_cap: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_stop_strings: int = Field(4, ge=0)
    max_stop_length: int = Field(64, ge=1)
    max_messages: int = Field(256, ge=1, description="chat messages in one request")
    progress_interval_ms: int = Field(50, ge=1)


class LimitSettings(Section):
    hard_time_limit: float = Field(60.0, gt=0)
    soft_time_limit: float = Field(55.0, gt=0)
    generation_budget: float = Field(50.0, gt=0)
    max_deliveries: int = Field(2, ge=1, description="runs of one job before it is failed")
    max_queue_depth: int = Field(1000, ge=1)
    result_ttl: int = Field(86400, ge=1, description="seconds a finished job stays readable")
    max_wait: float = Field(30.0, ge=0)
    max_stream: float = Field(300.0, gt=0,
                              description="seconds an SSE stream stays open; clients resume with Last-Event-ID")
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_inflight_per_key: int = Field(1000, ge=1, description="queued or running jobs (and open batches) per API key")
    max_bulk_depth: int = Field(2000, ge=1, description="micro-batch tasks waiting on the bulk queue")
    max_streams_per_key: int = Field(100, ge=1, description="open SSE streams per API key")
    convert_time_limit: float = Field(3600.0, ge=60)
    reap_after: float = Field(600.0, gt=0, description="seconds a job may stay queued before the reaper checks it")
    reap_grace: float = Field(60.0, ge=0, description="seconds past its time limit before a running job is reaped")
    reap_interval: float = Field(30.0, gt=0, description="seconds between stuck-job checks (run by the workers)")


class BatchSettings(Section):
    micro_batch_size: int = Field(32, ge=1, description="requests per batched generate call (one bulk task)")
    max_lines: int = Field(50_000, ge=1)
    max_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_line_bytes: int = Field(1_048_576, ge=64, description="bytes of one JSONL line (one request)")
    max_results: int = Field(10_000, ge=1, description="largest `limit` of GET /v1/batches/{id}/results")


class FileSettings(Section):
    """Files uploaded through POST /v1/files (batch input), kept in Redis."""

    max_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest upload")
    ttl: int = Field(7 * 86400, ge=60, description="seconds an uploaded file is kept")


def default_cache_dir() -> Path:
    """$QWEN_DEPLOY_CACHE (``~`` expanded), else ~/.cache/qwen-deploy: the one cache root."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen-deploy").expanduser()


class PathSettings(Section):
    """Roots that paths given over HTTP are relative to (they may not escape them)."""

    models_root: Path = Field(default_factory=lambda: default_cache_dir() / "models")
    checkpoints_root: Path = Field(default_factory=lambda: default_cache_dir() / "checkpoints")


class WebSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(2, ge=1)
    threads: int = Field(16, ge=1, description="gthread only: threads per process")
    worker_class: Literal["gevent", "gthread"] = "gevent"
    worker_connections: int = Field(2000, ge=1, description="gevent only: open connections per process")
    api_keys: list[SecretStr] = Field(default_factory=list)
    model_aliases: list[str] = Field(default_factory=list, description="other names accepted as `model`")
    admin_keys: list[SecretStr] = Field(default_factory=list, description="also allowed downloads, exports, /metrics")
    allow_unauthenticated: bool = Field(False, description="serve a non-loopback bind without API keys")
    trusted_hosts: list[str] | None = Field(None, description="Host header values served; default loopback + host")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not k.get_secret_value().strip() for k in keys):
            raise ValueError("API keys must be non-empty strings (an empty key would not disable auth)")
        return keys

    @property
    def keyed(self) -> bool:
        """Whether API keys are required."""
        return bool(self.api_keys or self.admin_keys)


class EngineSettings(Section):
    """The continuously batched decode loop of each generation worker child."""

    max_batch: int = Field(32, ge=1, description="sequences decoded together, per class (interactive, bulk)")
    max_batch_tokens: int = Field(65536, ge=64, description="prompt + max_new_tokens over a class's running rows")
    max_prefill_tokens: int = Field(8192, ge=64, description="prompt tokens prefilled together in one step")
    bulk_every: int = Field(4, ge=1, description="while interactive work runs, bulk rows step once in this many")
    lease_seconds: float = Field(10.0, gt=0, description="a claimed job whose worker stops renewing is re-run after")
    claim_interval_ms: int = Field(20, ge=1, description="how often a busy engine looks for waiting jobs")


class WorkerSettings(Section):
    proc_alive_timeout: float = Field(120.0, gt=0)
    heartbeat_interval: float = Field(10.0, gt=0)


class WebhookSettings(Section):
    """Signed job and batch webhooks (Standard Webhooks)."""

    secret: SecretStr | None = Field(None, description="whsec_<base64>; deliveries are not signed without it")
    allowed_hosts: list[str] = Field(default_factory=list, description="hosts exempt from the private-address check")
    retry_schedule: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0])
    timeout: float = Field(10.0, gt=0, description="seconds per delivery attempt")
    output_interval: float = Field(2.0, gt=0, description="at most one output event per job this often")

    @model_validator(mode="after")
    def _check_secret(self) -> WebhookSettings:
        import base64
        import binascii

        if self.secret is not None:
            raw = self.secret.get_secret_value()
            body = raw.removeprefix("whsec_")
            try:
                key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
                ok = raw.startswith("whsec_") and len(key) >= 16
            except (binascii.Error, ValueError):
                ok = False
            if not ok:
                raise ValueError("secret must be whsec_ followed by at least 16 base64-encoded bytes")
        return self


class Settings(Section):
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_master_name: str = Field("mymaster", min_length=1,
                                   description="the Sentinel master's name, for a sentinel:// redis_url")
    redis_wait_replicas: int | None = Field(None, ge=0, description=(
        "WAIT for this many replicas after a submit (0: no WAIT); default 1 for a sentinel:// URL, else 0"))
    redis_wait_ms: int = Field(100, ge=1, description="the WAIT's timeout in milliseconds")
    hf_token: SecretStr | None = None
    key_prefix: str = "qd"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    model: ModelSettings = Field(default_factory=ModelSettings)
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
