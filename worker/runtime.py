"""Per-process model state: load once in the worker child, publish readiness, keep a heartbeat."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

from qwen_deploy import registry, reloads
from qwen_deploy.adapters import registered
from qwen_deploy.config import Settings, get_settings
from qwen_deploy.connections import job_store, redis_client
from qwen_deploy.keys import model_loads_key
from qwen_deploy.model_load import LOAD_FAILED, MODEL_LOAD_FAILED, fail_pending, fail_queued
from qwen_deploy.model_load import load_error as load_error_of
from qwen_deploy.queues import push_drive
from qwen_deploy.reaper import reap_if_due
from qwen_deploy.served import Served, served_models
from qwen_deploy.stats_history import default_queues, record_if_due
from worker.handler import ModelHandler
from worker.reload import load_checkpoint, resolve

log = logging.getLogger(__name__)

_handler: ModelHandler | None = None
_driver: Any = None
_served: Served | None = None  # the model this process serves
_load_error: dict[str, str] | None = None  # why the model did not load (while it is not loaded)
_node: str | None = None  # this worker's Celery node (its own queue takes `drive` tasks)
_revision: dict[str, Any] | None = None  # the weights served: path, reload (None: the configured ones), since
RETRY_FIRST, RETRY_MAX = 10.0, 300.0  # seconds between tries to load a model that failed to load
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
        "adapters": list(handler.adapters.names) if handler and handler.adapters else [],
        "node": _node,
        **({"revision": _revision} if handler and _revision else {}),
        **({"error": _load_error} if state == LOAD_FAILED and _load_error else {}),
    }


def _state() -> str:
    return "ready" if _handler is not None else LOAD_FAILED if _load_error else "loading"


def load_error() -> dict[str, str] | None:
    """Why this process's model did not load ({code, message}), while it is not loaded; else None."""
    return _load_error if _handler is None else None


def served() -> Served:
    """The model this process serves (chosen by `init_process`)."""
    if _served is None:
        raise RuntimeError("no model was loaded in this process")
    return _served


def init_process(settings: Settings, model: Served | None = None, node: str | None = None) -> ModelHandler | None:
    """Load `model` (default: the default model; once per process) and start publishing this worker as
    ready. The handler sees settings whose `model` section is that model's entry. A model that does not
    load leaves the process up as `load_failed` (see qwen_deploy/model_load.py): it fails the model's
    queued jobs, and retries the load with backoff; None then."""
    global _served, _node
    if _handler is not None:
        return _handler
    _served, _node = model or served_models(settings)[0], node
    settings = settings.model_copy(update={"model": _served.model})
    client = redis_client(settings)
    name, ttl = process_name(), settings.worker.heartbeat_interval * 3
    registry.publish(client, settings.key_prefix, name, _record(settings, "loading", None), ttl)
    _load(settings)
    registry.publish(client, settings.key_prefix, name, _record(settings, _state(), _handler), ttl)
    if _load_error:
        fail_queued_jobs(settings)
    threading.Thread(target=_heartbeat, args=(settings, name, ttl), daemon=True, name="qd-heartbeat").start()
    return _handler


def _load(settings: Settings) -> bool:
    """Load the model (the weights it was last rolled to, else the configured ones); on failure record why
    (logged with its traceback, never silently)."""
    global _handler, _load_error, _revision
    rolled = reloads.weights(redis_client(settings), settings.key_prefix, served().alias)
    if rolled is not None:
        try:
            handler = load_checkpoint(ModelHandler(settings), resolve(settings, rolled["path"]))
        except Exception as exc:
            log.error(
                "the weights %s (reload %s) did not load (%s); loading the configured ones",
                rolled["path"],
                rolled["reload"],
                exc,
            )
        else:
            assert handler.info is not None
            path = handler.settings.model.name_or_path
            _handler, _load_error, _revision = handler, None, {**rolled, "path": path, "since": handler.info.loaded_at}
            return True
    handler = ModelHandler(settings)
    try:
        handler.setup()
    except Exception as exc:
        _load_error = load_error_of(settings.model.name_or_path, exc, (settings.token,))
        log.error("%s; its jobs fail with %s until it loads", _load_error["message"], MODEL_LOAD_FAILED, exc_info=True)
        return False
    redis_client(settings).incr(model_loads_key(settings.key_prefix))
    assert handler.info is not None
    revision = {"path": settings.model.name_or_path, "reload": None, "since": handler.info.loaded_at}
    _handler, _load_error, _revision = handler, None, revision
    return True


def swapped(handler: ModelHandler, revision: dict[str, Any]) -> None:
    """The driver serves new weights (a reload): this process's handler, revision and record follow."""
    global _handler, _revision
    _handler, _revision = handler, revision
    settings = get_settings()
    client = redis_client(settings)
    registry.publish(
        client,
        settings.key_prefix,
        process_name(),
        _record(settings, _state(), _handler),
        settings.worker.heartbeat_interval * 3,
    )


def _other_ready(settings: Settings) -> bool:
    """Whether another worker of this process's model has it loaded."""
    found = registry.workers(redis_client(settings), settings.key_prefix)
    return any(w.get("state") == "ready" for w in registry.by_model(found, served().alias, served().default))


def fail_queued_jobs(settings: Settings) -> int:
    """Fail the served model's queued jobs with the load error, unless another worker of it is ready."""
    if _load_error is None or _other_ready(settings):
        return 0
    failed = fail_pending(job_store(settings), served().alias, _load_error)
    if failed:
        log.warning("failed %d queued job(s) of %r: %s", failed, served().alias, _load_error["message"])
    return failed


def answer_unloaded(settings: Settings, job_id: str) -> str:
    """A job delivered while this process's model is not loaded: it fails with the load error, or, while
    another worker of the model is ready, its message goes back to the end of its queue for that worker
    (after a pause, so that a failed worker never spins on it)."""
    store, error = job_store(settings), _load_error or {"code": MODEL_LOAD_FAILED, "message": "not loaded"}
    if _other_ready(settings):
        record = store.get(job_id) or {}
        if record.get("status") == "queued" and record.get("message"):
            _stop.wait(1.0)
            store.push_message(record.get("queue", ""), record["message"])
            return "requeued"
    fail_queued(store, job_id, error)
    return MODEL_LOAD_FAILED


def _heartbeat(settings: Settings, name: str, ttl: float) -> None:
    """Refresh this worker's registration and run the stuck-job check when it is due. While the model is
    not loaded: fail its queued jobs, and retry the load with backoff (10 s, doubling up to 5 minutes)."""
    client, store, lim = redis_client(settings), job_store(settings), settings.limits
    retry_in = RETRY_FIRST
    next_load = time.monotonic() + retry_in
    while not _stop.wait(settings.worker.heartbeat_interval):
        try:
            if _handler is None and time.monotonic() >= next_load:
                retry_in = min(retry_in * 2, RETRY_MAX)
                if not _load(settings):
                    log.warning("next try to load the model in %g s", retry_in)
                next_load = time.monotonic() + retry_in
            sync_idle_adapters(settings, client)
            wake_for_reload(settings, client, name)
            registry.publish(client, settings.key_prefix, name, _record(settings, _state(), _handler), ttl)
            fail_queued_jobs(settings)
            reap_if_due(store, lim.reap_interval, lim.max_deliveries, lim.hard_time_limit + lim.reap_grace)
            record_if_due(store, settings.worker.stats_interval, default_queues(store))
        except Exception as exc:  # Redis may be briefly away; the next beat retries
            log.warning("heartbeat failed: %s", exc)


def loaded() -> bool:
    """Whether this process loaded its model."""
    return _handler is not None


def sync_idle_adapters(settings: Settings, client: Any) -> None:
    """An idle worker (no task stepping its engine) loads and drops LoRA adapters loaded or unloaded at runtime
    here; a busy one does so between steps (worker/driver.py)."""
    adapters = _handler.adapters if _handler is not None else None
    if adapters is None or not adapters.lock.acquire(blocking=False):
        return
    try:
        busy = {s.adapter for s in _driver.engine.sequences() if s.adapter} if _driver is not None else set()
        adapters.sync(registered(client, settings, served()), busy)
    finally:
        adapters.lock.release()


def wake_for_reload(settings: Settings, client: Any, name: str) -> None:
    """An idle worker whose turn in a reload is due (and whose wake-up was missed) gets a driving task."""
    if _handler is not None and _node is not None and reloads.due(client, settings.key_prefix, served().alias, name):
        push_drive(client, settings.key_prefix, _node)


def get_handler() -> ModelHandler:
    if _handler is None:
        raise RuntimeError("the model is not loaded in this process")
    return _handler


def get_driver(settings: Settings, node: str) -> Any:
    """This child's engine driver (created on first use); hand-offs go to the worker's own queue."""
    global _driver
    if _driver is None:
        from worker.driver import Driver

        client = redis_client(settings)

        def handoff() -> None:
            push_drive(client, settings.key_prefix, node)

        _driver = Driver(get_handler(), job_store(settings), process_name(), handoff, model=served(), on_swap=swapped)
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
