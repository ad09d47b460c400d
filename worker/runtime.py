"""Per-process model state: load once in the worker child, publish readiness, keep a heartbeat."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import asdict
from typing import Any

from qwen_deploy import registry
from qwen_deploy.config import Settings
from qwen_deploy.connections import job_store, redis_client
from qwen_deploy.keys import model_loads_key
from qwen_deploy.reaper import reap_if_due
from qwen_deploy.served import Served, served_models
from worker.handler import ModelHandler

log = logging.getLogger(__name__)

_handler: ModelHandler | None = None
_driver: Any = None
_served: Served | None = None  # the model this process serves
_stop = threading.Event()


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _record(settings: Settings, state: str, handler: ModelHandler | None) -> dict[str, object]:
    info = handler.info if handler else None
    return {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "state": state,
        "alias": served().alias,
        "model": asdict(info) if info else {"name": settings.model.name_or_path},
    }


def served() -> Served:
    """The model this process serves (chosen by `init_process`)."""
    if _served is None:
        raise RuntimeError("no model was loaded in this process")
    return _served


def init_process(settings: Settings, model: Served | None = None) -> ModelHandler:
    """Load `model` (default: the default model; once per process) and start publishing this worker as
    ready. The handler sees settings whose `model` section is that model's entry."""
    global _handler, _served
    if _handler is not None:
        return _handler
    _served = model or served_models(settings)[0]
    settings = settings.model_copy(update={"model": _served.model})
    client = redis_client(settings)
    name, ttl = process_name(), settings.worker.heartbeat_interval * 3
    registry.publish(client, settings.key_prefix, name, _record(settings, "loading", None), ttl)
    handler = ModelHandler(settings)
    handler.setup()
    client.incr(model_loads_key(settings.key_prefix))
    _handler = handler
    registry.publish(client, settings.key_prefix, name, _record(settings, "ready", handler), ttl)
    threading.Thread(target=_heartbeat, args=(settings, name, ttl), daemon=True, name="qd-heartbeat").start()
    return handler


def _heartbeat(settings: Settings, name: str, ttl: float) -> None:
    """Refresh this worker's registration and run the stuck-job check when it is due."""
    client, store, lim = redis_client(settings), job_store(settings), settings.limits
    while not _stop.wait(settings.worker.heartbeat_interval):
        try:
            registry.publish(client, settings.key_prefix, name, _record(settings, "ready", _handler), ttl)
            reap_if_due(store, lim.reap_interval, lim.max_deliveries, lim.hard_time_limit + lim.reap_grace)
        except Exception as exc:  # Redis may be briefly away; the next beat retries
            log.warning("heartbeat failed: %s", exc)


def get_handler() -> ModelHandler:
    if _handler is None:
        raise RuntimeError("the model is not loaded in this process")
    return _handler


def get_driver(settings: Settings, node: str) -> Any:
    """This child's engine driver (created on first use); hand-offs go to the worker's own queue."""
    global _driver
    if _driver is None:
        from qwen_deploy.keys import queue_key
        from qwen_deploy.queues import DRIVE_TASK, engine_queue, task_message
        from worker.driver import Driver

        client, queue = redis_client(settings), engine_queue(settings.key_prefix, node)

        def handoff() -> None:
            if not client.llen(queue_key(settings.key_prefix, queue)):
                task_id = f"drive-{uuid.uuid4().hex}"
                client.lpush(queue_key(settings.key_prefix, queue), task_message(DRIVE_TASK, task_id, queue, []))

        _driver = Driver(get_handler(), job_store(settings), process_name(), handoff, model=served())
        try:
            _driver.adopt_orphans()
        except Exception as exc:  # Redis away: leases and the reaper settle those jobs later
            log.warning("could not look for orphaned jobs: %s", exc)
    return _driver


def keep_driven() -> None:
    """After each task of this child: an engine left holding sequences is handed to a driving task."""
    if _driver is not None:
        _driver.hand_on()


def shutdown_process(settings: Settings) -> None:
    _stop.set()
    try:
        registry.remove(redis_client(settings), settings.key_prefix, process_name(), served().alias)
    except Exception as exc:
        log.warning("could not remove worker registration: %s", exc)
