"""The app's shared objects (settings, Redis client, job store), looked up from the request's app.

Named `current_services()`, not `services()`, so `web.services` (the package the routes call) is one thing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import cast

import redis
from flask import current_app

from qwen_deploy.batches import BatchStore
from qwen_deploy.config import Settings
from qwen_deploy.jobs import JobStore
from qwen_deploy.webhook_store import WebhookStore

EXTENSION = "qwen_deploy"  # app.extensions[EXTENSION]: the Services object create_app made


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore

    @functools.cached_property
    def batches(self) -> BatchStore:
        """The batch store, made once (it registers its scripts when made)."""
        return BatchStore(self.redis, self.settings.key_prefix, self.settings.limits.result_ttl)

    @functools.cached_property
    def webhooks(self) -> WebhookStore:
        """The webhook deliveries store, made once."""
        return WebhookStore(self.redis, self.settings)


def current_services() -> Services:
    """The Services of the app handling the current request (or app context)."""
    return cast(Services, current_app.extensions[EXTENSION])
