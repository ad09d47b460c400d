"""Worker process hooks: the model loads in each prefork child, never in the parent.

The hooks read the worker's app as Celery's current app, so this module never imports `tasks.app` (which
imports it for its bootstep).
"""

from __future__ import annotations

import logging
import os
import sys

from celery import bootsteps, current_app, signals

from qwen_deploy.config import get_settings
from qwen_deploy.queues import GENERATION_QUEUES
from qwen_deploy.served import all_generation_queues

log = logging.getLogger(__name__)
_node: str | None = None  # this worker's Celery node name (set in the parent before the children fork)


def _consumed(app: object) -> set[str]:
    consume = getattr(getattr(app, "amqp", None), "queues", None)
    return set(getattr(consume, "consume_from", None) or {}) or set(GENERATION_QUEUES)


def _serves_generation(app: object) -> bool:
    """Whether this worker consumes any model's interactive or bulk queue."""
    return bool(_consumed(app) & all_generation_queues(get_settings()))


class PromptRespawn(bootsteps.StartStopStep):
    """Replace a dead child within a quarter of a second. Celery learns of a child's exit from its sentinel
    fd, but for a child that itself replaced a dead one that can be missed until the pool's 5 s maintenance
    timer: a killed child's jobs then wait up to 5 s for their successor."""

    requires = ("celery.worker.components:Pool",)

    def register_with_event_loop(self, worker: object, hub: object) -> None:
        maintain = getattr(getattr(worker, "pool", None), "maintain_pool", None)
        if maintain is not None:
            hub.call_repeatedly(0.25, maintain)  # type: ignore[attr-defined]


@signals.after_setup_logger.connect
def _log_format(logger: logging.Logger | None = None, **_: object) -> None:
    from qwen_deploy.logs import configure

    settings = get_settings()
    configure(settings.log_format, settings.log_level, logger)


@signals.celeryd_after_setup.connect
def _engine_queue(sender: str, instance: object, **_: object) -> None:
    """A generation worker also consumes its own queue (after interactive and bulk): the engine's hand-offs."""
    from qwen_deploy.queues import engine_queue

    global _node
    app = instance.app  # type: ignore[attr-defined]
    _node = sender  # forked children inherit it: their own queue's name
    if _serves_generation(app):
        app.amqp.queues.select_add(engine_queue(get_settings().key_prefix, sender))


@signals.worker_init.connect
def _before_fork(sender: object = None, **_: object) -> None:
    """Runs once in the parent. Idle OpenMP threads must not spin on a small shared box.

    A generation worker also imports (never runs) torch and transformers here, so that every child
    forked later, including one that replaces a killed child, loads its model in a fraction of a
    second instead of paying those imports again. No tensor, thread pool or CUDA context is created
    in the parent: the model itself still loads only in the child.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if _serves_generation(current_app):
        from qwen_deploy.connections import redis_client
        from qwen_deploy.runtime_models import worker_model
        from worker.handler import ModelHandler

        try:
            settings = get_settings()
            model = worker_model(settings, _consumed(current_app), redis_client(settings)).model
            ModelHandler(settings.model_copy(update={"model": model})).preload_modules()
        except Exception as exc:  # the child loads (and reports) for real
            log.warning("could not preload the model's modules: %s", exc)


@signals.worker_process_init.connect
def _load_model(**_: object) -> None:
    from qwen_deploy.connections import reset_after_fork

    reset_after_fork()
    if not _serves_generation(current_app):
        return
    from qwen_deploy.connections import redis_client
    from qwen_deploy.runtime_models import worker_model
    from worker.runtime import init_process

    settings = get_settings()
    init_process(settings, worker_model(settings, _consumed(current_app), redis_client(settings)), _node)


@signals.task_postrun.connect
def _keep_engine_driven(**_: object) -> None:
    """No task leaves its child's engine holding sequences without a driving task: a task that claimed
    or took over jobs but did not drive them (its own job was already over) hands the engine on."""
    runtime = sys.modules.get("worker.runtime")
    if runtime is not None:
        runtime.keep_driven()


@signals.worker_process_shutdown.connect
def _unregister(**_: object) -> None:
    runtime = sys.modules.get("worker.runtime")  # a convert child never loaded it: do not import torch to exit
    if runtime is not None and runtime.loaded():
        runtime.shutdown_process(get_settings())
