"""The batch and webhook stores over the app's Redis client and settings."""

from __future__ import annotations

from qwen_deploy.batches import BatchStore
from qwen_deploy.webhook_store import WebhookStore
from web.context import current_services


def batch_store() -> BatchStore:
    svc = current_services()
    return BatchStore(svc.redis, svc.settings.key_prefix, svc.settings.limits.result_ttl)


def webhook_store() -> WebhookStore:
    svc = current_services()
    return WebhookStore(svc.redis, svc.settings)
