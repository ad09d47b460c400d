"""The batch and webhook stores over the app's Redis client and settings."""

from __future__ import annotations

from qwen_deploy.batches import BatchStore
from qwen_deploy.webhook_store import WebhookStore
from web.context import current_services


def batch_store() -> BatchStore:
    return current_services().batches


def webhook_store() -> WebhookStore:
    return current_services().webhooks
