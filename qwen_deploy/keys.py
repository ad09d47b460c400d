"""The Redis key names of job records and the sets around them, all under the deployment's `key_prefix`.

`JobStore` (qwen_deploy/jobs.py) inherits them; the Lua scripts receive these names as KEYS.
"""

from __future__ import annotations

import hashlib

from qwen_deploy import registry


def queue_key(prefix: str, queue: str) -> str:
    """The Redis list of a Celery queue: kombu's transport runs with `global_keyprefix` = "{prefix}:"
    (tasks/app.py), so two deployments with different `key_prefix` share one Redis database."""
    return f"{prefix}:{queue}"


def unacked_key(prefix: str) -> str:
    """kombu's hash of delivered, unacknowledged messages: delivery tag -> [message, exchange, key]."""
    return queue_key(prefix, "unacked")


def unacked_index_key(prefix: str) -> str:
    return queue_key(prefix, "unacked_index")


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
        return f"{self.prefix}:stats"

    def active_key(self) -> str:
        return f"{self.prefix}:active"

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
        return registry.model_key(self.prefix, model)

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
