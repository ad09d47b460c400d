"""Every Redis key name of a deployment, all under its `key_prefix`: job records and the sets around
them (`JobKeys`, which `JobStore` inherits), batches (`BatchKeys`), webhook deliveries (`WebhookKeys`),
uploaded files (`FileKeys`), the worker registry, and the Celery queues kombu keeps under the prefix.

No other Python module builds a key string. The Lua scripts receive these names as KEYS; those that
visit many jobs (CLAIM, PURGE, the deadline sweep, `common.lua`'s close and notify) get the prefix and
build the same shapes (`{prefix}:job:{id}`, `{prefix}:held:{worker}`, `{prefix}:webhook:{msg}`,
`{prefix}:webhooks:due`, `{prefix}:deadlines`, `{prefix}:done_times`). Two deployments with different
prefixes can therefore share one Redis database.
"""

from __future__ import annotations

import hashlib


def kombu_keyprefix(prefix: str) -> str:
    """kombu's `global_keyprefix` (tasks/app.py): every key of its transport (queues, unacked, bindings)
    starts with it, while queue names stay plain for `celery -Q`."""
    return f"{prefix}:"


def queue_key(prefix: str, queue: str) -> str:
    """The Redis list of a Celery queue (kombu prepends `kombu_keyprefix`), so two deployments with
    different `key_prefix` share one Redis database."""
    return kombu_keyprefix(prefix) + queue


def unacked_key(prefix: str) -> str:
    """kombu's hash of delivered, unacknowledged messages: delivery tag -> [message, exchange, key]."""
    return queue_key(prefix, "unacked")


def unacked_index_key(prefix: str) -> str:
    return queue_key(prefix, "unacked_index")


def stats_key(prefix: str) -> str:
    """The `/metrics` counters and histogram buckets (written inside the Lua transitions)."""
    return f"{prefix}:stats"


def streams_key(prefix: str, owner: str) -> str:
    """An owner's open SSE streams, scored by when each slot lapses."""
    return f"{prefix}:owner:{owner}:streams"


def quota_keys(prefix: str, owner: str, kind: str) -> tuple[str, str, str]:
    """An owner's byte quota of one kind: entry -> bytes (zset), entry -> when it lapses (zset), the total."""
    base = f"{prefix}:owner:{owner}:quota:{kind}"
    return base, base + ":lapse", base + ":total"


# -- the worker registry (qwen_deploy/registry.py) --------------------------------------------------
def worker_key(prefix: str, name: str) -> str:
    """One worker child's record (expires 3 heartbeats after its last refresh)."""
    return f"{prefix}:worker:{name}"


def workers_key(prefix: str) -> str:
    """Worker names scored by their record's expiry."""
    return f"{prefix}:workers"


def model_workers_key(prefix: str, alias: str) -> str:
    """The live workers of one model, scored like `workers_key` (SUBMIT reads it)."""
    return f"{prefix}:model:{alias}:workers"


def adapters_key(prefix: str, alias: str) -> str:
    """The LoRA adapters loaded at runtime for a model: name -> directory."""
    return f"{prefix}:adapters:{alias}"


def runtime_models_key(prefix: str) -> str:
    """Models registered at runtime (a merged export's `serve_as`): alias -> JSON {path, registered_at, ...}."""
    return f"{prefix}:models:runtime"


def adapters_version_key(prefix: str) -> str:
    """Bumped on every runtime adapter load or unload: workers compare it between steps and sync."""
    return f"{prefix}:adapters:version"


def reload_key(prefix: str, reload_id: str) -> str:
    """A model reload's record (hash): model, path, status, each worker's progress."""
    return f"{prefix}:reload:{reload_id}"


def reload_turn_key(prefix: str, reload_id: str) -> str:
    """The worker whose turn it is in a reload (string with a lease): one worker of the model at a time."""
    return f"{prefix}:reload:{reload_id}:turn"


def model_reload_key(prefix: str, alias: str) -> str:
    """A model's reloads: `current` (the one queued or running, set only when none is) and `last` (hash)."""
    return f"{prefix}:model:{alias}:reload"


def model_weights_key(prefix: str, alias: str) -> str:
    """The weights a model was last rolled to (hash: path, reload, since): what its new workers load."""
    return f"{prefix}:model:{alias}:weights"


def model_loads_key(prefix: str) -> str:
    """Model loads across all workers."""
    return f"{prefix}:stats:model_loads"


class JobKeys:
    """Key names for one deployment (`prefix`); the default model's sets keep the plain names."""

    def __init__(self, prefix: str = "qd", default_model: str = "") -> None:
        self.prefix = prefix
        self.default_model = default_model

    def queue_key(self, queue: str) -> str:
        return queue_key(self.prefix, queue)

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:ev"

    def stats_key(self) -> str:
        return stats_key(self.prefix)

    def active_key(self) -> str:
        return f"{self.prefix}:active"

    def done_times_key(self) -> str:
        """The times of the last generation completions (the completion rate behind queue estimates)."""
        return f"{self.prefix}:done_times"

    def reaper_lock_key(self) -> str:
        """Held while one process runs a reaper pass."""
        return f"{self.prefix}:reaper:lock"

    def stats_history_key(self) -> str:
        """Samples of the counters and queue depths, newest first (the console's charts)."""
        return f"{self.prefix}:stats:history"

    def stats_history_lock_key(self) -> str:
        """Held for one sampling interval by the process that took the last sample."""
        return f"{self.prefix}:stats:history:lock"

    def pending_key(self, model: str | None = None) -> str:
        """A model's queued generation jobs, scored by priority rank * 1e10 + submit time: what its engines
        claim from (high before normal before low, oldest first within a priority). The default model
        (None or `default_model`) keeps the plain key."""
        if model is None or model == self.default_model:
            return f"{self.prefix}:pending:interactive"
        return f"{self.prefix}:pending:interactive:{model}"

    def fair_key(self, model: str | None = None) -> str:
        """Each key's virtual clock for its model's pending set (start-time fair queueing, see SUBMIT)."""
        return self.pending_key(model) + ":vt"

    def engines_key(self, host: str, model: str | None = None) -> str:
        """Engine processes of one model seen on a host (a replacement child takes over dead ones' jobs)."""
        if model is None or model == self.default_model:
            return f"{self.prefix}:engines:{host}"
        return f"{self.prefix}:engines:{host}:{model}"

    def model_workers_key(self, model: str) -> str:
        """Live workers of one model, scored by their registration's expiry (see qwen_deploy.registry)."""
        return model_workers_key(self.prefix, model)

    def deadlines_key(self) -> str:
        """Jobs with a deadline, scored by it (the deadline sweep)."""
        return f"{self.prefix}:deadlines"

    def held_key(self, worker: str) -> str:
        """The jobs a worker's engine has claimed (taken over at once when that worker is found dead)."""
        return f"{self.prefix}:held:{worker}"

    def idem_key(self, key: str, owner: str = "", route: str = "") -> str:
        """Idempotency keys are scoped per owner and route (hashed: a key may hold any characters)."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return f"{self.prefix}:idem:{owner}:{route}:{digest}"

    def index_key(self, owner: str) -> str:
        """The owner's jobs, newest last (ids sort by creation time)."""
        return f"{self.prefix}:owner:{owner}:jobs"

    def inflight_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:inflight"


class BatchKeys:
    """A batch's record and lists, and an owner's batch sets."""

    def __init__(self, prefix: str = "qd") -> None:
        self.prefix = prefix

    def key(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def requests_key(self, batch_id: str) -> str:
        """The valid request lines, read by micro-batch index range."""
        return self.key(batch_id) + ":req"

    def outputs_key(self, batch_id: str) -> str:
        """Output lines (JSONL), up-front error lines first."""
        return self.key(batch_id) + ":out"

    def chunks_key(self, batch_id: str) -> str:
        """Micro-batches already recorded (a re-run is a no-op)."""
        return self.key(batch_id) + ":chunks"

    def tries_key(self, batch_id: str) -> str:
        """Runs per micro-batch."""
        return self.key(batch_id) + ":tries"

    def index_key(self, owner: str) -> str:
        """An owner's batch ids by creation time (for listing without a keyspace scan)."""
        return f"{self.prefix}:owner:{owner}:batch_index"

    def open_key(self, owner: str) -> str:
        """An owner's batches that may still be running (the per-key cap on open batches)."""
        return f"{self.prefix}:owner:{owner}:batches"


class WebhookKeys:
    """Webhook deliveries, the sets that schedule them, and each subject's attempt log."""

    def __init__(self, prefix: str = "qd") -> None:
        self.prefix = prefix

    def due_key(self) -> str:
        """Pending deliveries scored by their next attempt time."""
        return f"{self.prefix}:webhooks:due"

    def watch_key(self) -> str:
        """Jobs with `output` in their filter, scored by when to look at them again."""
        return f"{self.prefix}:webhooks:watch"

    def delivery_key(self, msg_id: str) -> str:
        return f"{self.prefix}:webhook:{msg_id}"

    def subject_key(self, kind: str, subject: str) -> str:
        """The record a delivery is about: a job's (`JobKeys.key`) or a batch's (`BatchKeys.key`)."""
        return f"{self.prefix}:{kind}:{subject}"

    def attempts_key(self, kind: str, subject: str) -> str:
        return self.subject_key(kind, subject) + ":webhooks"


class FileKeys:
    """Uploaded files (batch input): one hash per file, an index per owner."""

    def __init__(self, prefix: str = "qd") -> None:
        self.prefix = prefix

    def key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def index_key(self, owner: str) -> str:
        """The owner's file ids by creation time."""
        return f"{self.prefix}:owner:{owner}:files"
