"""Webhook delivery on the `webhooks` queue: a dispatcher thread in each worker child that consumes it.

Deliveries wait in Redis (`{prefix}:webhooks:due`, scored by the next attempt time), not in Celery
countdowns, so retries survive restarts. The task runs one dispatch pass (a manual kick; the thread
does the regular work and is not held up by a long convert task in the same child).
"""

from __future__ import annotations

import logging

from celery import shared_task, signals

from qwen_deploy.config import get_settings
from qwen_deploy.queues import WEBHOOKS, WEBHOOKS_TASK

log = logging.getLogger(__name__)
_dispatcher: list[object] = []


def _consumes_webhooks() -> bool:
    from tasks.app import app

    consume = getattr(getattr(app, "amqp", None), "queues", None)
    return WEBHOOKS in set(getattr(consume, "consume_from", None) or {})


@signals.worker_process_init.connect
def _start_dispatcher(**_: object) -> None:
    if not _consumes_webhooks():
        return
    from qwen_deploy.webhook_store import Dispatcher

    _dispatcher.append(Dispatcher(get_settings()).start())
    log.info("webhook dispatcher started")


@signals.worker_process_shutdown.connect
def _stop_dispatcher(**_: object) -> None:
    while _dispatcher:
        _dispatcher.pop().stop()  # type: ignore[attr-defined]


@shared_task(name=WEBHOOKS_TASK)
def dispatch_webhooks() -> int:
    """Send every webhook delivery that is due now; the number of attempts made."""
    from qwen_deploy.connections import redis_client
    from qwen_deploy.webhook_store import WebhookStore, dispatch_due

    settings = get_settings()
    return dispatch_due(WebhookStore(redis_client(settings), settings))
