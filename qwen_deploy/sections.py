"""The sections of the settings (`model`, `limits`, `web`, ...): typed, with their defaults and bounds.

`qwen_deploy.config` assembles them into `Settings` and loads them; import them from there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

CACHE_ENV = "QWEN_DEPLOY_CACHE"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    revision: str | None = None
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    threads: int = Field(0, ge=0, description="torch threads in the worker child; 0 = cores - 1")
    pack_cpu_weights: bool = Field(
        True,
        description="bf16 on a CPU: pack linear weights once (for the C matmul where it runs, else oneDNN's) "
        "(worker/cpu_weights.py)",
    )
    cpu_kernel: bool = Field(
        True,
        validation_alias=AliasChoices("cpu_kernel", "one_row_kernel"),
        description="bf16 on a CPU with AVX-512 BF16 and one torch thread: every linear layer runs the C matmul "
        "(worker/cpu_kernels.py) on weights packed in its tile layout; false: oneDNN's packed matmul "
        "(`one_row_kernel`, its former name, is still read)",
    )
    trust_remote_code: bool = False
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served per request: name -> PEFT directory (relative to paths.models_root)",
    )
    task: Literal["generate", "embed"] = Field(
        "generate", description="generate: text routes; embed: /v1/embeddings only (pooled hidden states)"
    )
    embed_dimensions: list[int] = Field(
        default_factory=list,
        description="task embed: the `dimensions` a request may ask for (a Matryoshka-trained model's sizes); "
        "empty: `dimensions` is refused",
    )

    @model_validator(mode="after")
    def _embed_fields(self) -> ModelSettings:
        if any(d < 1 for d in self.embed_dimensions):
            raise ValueError("embed_dimensions: sizes of at least 1")
        if self.embed_dimensions and self.task != "embed":
            raise ValueError("embed_dimensions is for a model with task: embed")
        if self.adapters and self.task == "embed":
            raise ValueError("adapters are served for task: generate only")
        return self

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name, path in adapters.items():
            if not re.fullmatch(ALIAS_PATTERN, name):
                raise ValueError(f"adapter name {name!r}: letters, digits, '.', '_' or '-' (up to 64)")
            pure = PurePosixPath(path)
            if not path or pure.is_absolute() or path.startswith("~") or ".." in pure.parts:
                raise ValueError(f"adapter {name!r}: a path relative to paths.models_root, without '..'")
        return adapters


ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # it names queues and keys: no ':', '/' or spaces


class ModelEntry(ModelSettings):
    """One model of `models:`; `alias` is its id in `model` fields and /v1/models, and names its queues."""

    alias: str = Field(pattern=ALIAS_PATTERN, description="letters, digits, '.', '_' or '-' (up to 64)")


class GenerationSettings(Section):
    max_new_tokens_cap: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_stop_strings: int = Field(4, ge=0)
    max_stop_length: int = Field(64, ge=1)
    max_messages: int = Field(256, ge=1, description="chat messages in one request")
    progress_interval_ms: int = Field(50, ge=1)
    strict_requests: bool = Field(
        False,
        description="a stored request holding a field this version does not know fails its job (invalid_request) "
        "instead of the field being logged and ignored; the test suite turns it on",
    )


class LimitSettings(Section):
    hard_time_limit: float = Field(60.0, gt=0)
    soft_time_limit: float = Field(55.0, gt=0)
    generation_budget: float = Field(50.0, gt=0)
    max_deliveries: int = Field(2, ge=1, description="runs of one job before it is failed")
    max_queue_depth: int = Field(1000, ge=1)
    result_ttl: int = Field(86400, ge=1, description="seconds a finished job stays readable")
    max_wait: float = Field(30.0, ge=0)
    max_stream: float = Field(
        300.0, gt=0, description="seconds an SSE stream stays open; clients resume with Last-Event-ID"
    )
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_inflight_per_key: int = Field(1000, ge=1, description="queued or running jobs (and open batches) per API key")
    max_bulk_depth: int = Field(2000, ge=1, description="micro-batch tasks waiting on the bulk queue")
    max_queued_unserved: int = Field(
        16, ge=0, description="jobs queued for a model no live worker serves (beyond: 503 model_unavailable)"
    )
    fair_tokens_per_second: float = Field(
        100.0,
        ge=0,
        description=(
            "fair queueing across API keys: each queued generation job advances its key's virtual clock by "
            "max_new_tokens x n / this many seconds, so one key's backlog never holds another key's new job "
            "back; 0 = plain FIFO within a priority"
        ),
    )
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
    max_open_bytes_per_key: int = Field(
        256 * 1024 * 1024, ge=1024, description="request bytes of one key's batches still running; past it: 429"
    )


class FileSettings(Section):
    """Files uploaded through POST /v1/files (batch input), kept in Redis."""

    max_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest upload")
    ttl: int = Field(7 * 86400, ge=60, description="seconds an uploaded file is kept")
    max_bytes_per_key: int = Field(
        100 * 1024 * 1024, ge=1024, description="bytes of one key's stored files; past it: 429 quota_exceeded"
    )


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
    body_timeout: float = Field(10.0, gt=0, description="seconds to receive a request body; past it: 408")
    max_body_reads_per_key: int = Field(
        64, ge=1, description="request bodies one key may have in transit per web process; past it: 429"
    )
    probe_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="also answer GET /livez on this port, from a thread outside the connection pool (null: off)",
    )

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
    prefix_cache_tokens: int = Field(
        16384, ge=0, description="prompt-prefix KV kept across jobs, in tokens (LRU; 0 disables)"
    )
    lean_forward: Literal["auto", "off"] = Field(
        "auto",
        description="auto: the engine's own lean forward for Llama, Qwen2 and Qwen3 models (others keep "
        "transformers' forward); off: transformers' forward always",
    )
    max_adapters: int = Field(
        8, ge=1, description="LoRA adapters resident per worker child (LRU; more are loaded on demand)"
    )
    reload_drain_seconds: float = Field(
        10.0,
        ge=0,
        description="during a model reload, how long a worker lets its running jobs finish on the old weights "
        "before it hands the rest back (they resume from their streamed tokens)",
    )


class WorkerSettings(Section):
    proc_alive_timeout: float = Field(120.0, gt=0)
    heartbeat_interval: float = Field(10.0, gt=0)
    stats_interval: float = Field(
        10.0, gt=0, description="seconds between samples of the counters for the console's charts (15 minutes kept)"
    )
    model: str | None = Field(
        None,
        description="alias of the model a generation worker serves; default: the first "
        "(or the one whose queues it consumes)",
    )


class WebhookSettings(Section):
    """Signed job and batch webhooks (Standard Webhooks)."""

    secret: SecretStr | None = Field(None, description="whsec_<base64>; deliveries are not signed without it")
    allowed_hosts: list[str] = Field(default_factory=list, description="hosts exempt from the private-address check")
    retry_schedule: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0])
    timeout: float = Field(10.0, gt=0, description="seconds per delivery attempt")
    connect_timeout: float = Field(3.0, gt=0, description="seconds to open the connection (within `timeout`)")
    per_destination: int = Field(
        2, ge=1, description="deliveries in flight at once to one receiver (host:port), per sending process"
    )
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
