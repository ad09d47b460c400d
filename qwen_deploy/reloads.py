"""Model reloads: a served model rolled to new weights one worker at a time, without losing a job.

`POST /v1/models/{id}/reload` records a reload (`{prefix}:reload:{id}`) naming the model's live workers, each
`waiting`, and marks it the model's `current` one (one at a time per model). Each of those workers, between
engine steps or in its heartbeat when idle, asks whether its turn is due: the turn is a lease
(`{prefix}:reload:{id}:turn`) held by one worker at a time. The worker holding it stops claiming (`draining`),
finishes or hands back what it holds, loads the new weights (`loading`) and claims again (`succeeded`), or keeps
its old weights (`failed`, which fails the reload and leaves the workers not yet rolled on the old weights).
Workers that vanished are marked `gone`. The first success records the weights in `{prefix}:model:{alias}:weights`,
which the model's workers started later load instead of the configured ones.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import WatchError

from qwen_deploy.job_records import as_text
from qwen_deploy.keys import (
    model_reload_key,
    model_weights_key,
    model_workers_key,
    reload_key,
    reload_turn_key,
)
from qwen_deploy.lua import script
from qwen_deploy.queues import push_drive

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
WAITING, DRAINING, LOADING, SKIPPED, GONE = "waiting", "draining", "loading", "skipped", "gone"
ENDED = frozenset({SUCCEEDED, FAILED, SKIPPED, GONE})  # a worker's states that are over


def new_id() -> str:
    return f"reload_{uuid.uuid4().hex[:24]}"


def create(
    client: Any, prefix: str, alias: str, path: str, workers: list[dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """Record a reload of `alias` to `path` (relative to `paths.models_root`: each worker resolves it under its own)
    on `workers` (their registry records) and wake them; (record, True), or the model's reload still queued or
    running and False."""
    reload_id = new_id()
    pointer = model_reload_key(prefix, alias)
    if not client.hsetnx(pointer, "current", reload_id):
        current = as_text(client.hget(pointer, "current"))
        found = get(client, prefix, current)
        if found is not None and found["status"] in (QUEUED, RUNNING):
            return found, False
        client.hset(pointer, "current", reload_id)  # a pointer left by an expired record
    now = time.time()
    record = {
        "id": reload_id,
        "model": alias,
        "path": path,
        "status": QUEUED,
        "created_at": repr(now),
        "workers": json.dumps(
            [{"worker": w["name"], "node": w.get("node"), "state": WAITING, "since": now} for w in workers]
        ),
    }
    pipe = client.pipeline()
    pipe.hset(reload_key(prefix, reload_id), mapping=record)
    pipe.hset(pointer, "last", reload_id)
    pipe.execute()
    made = _decode(record)
    wake(client, prefix, made)
    return made, True


def get(client: Any, prefix: str, reload_id: str) -> dict[str, Any] | None:
    raw = client.hgetall(reload_key(prefix, reload_id))
    return _decode({as_text(k): as_text(v) for k, v in raw.items()}) if raw else None


def last(client: Any, prefix: str, alias: str) -> dict[str, Any] | None:
    """The model's latest reload (running or ended), or None."""
    reload_id = client.hget(model_reload_key(prefix, alias), "last")
    return get(client, prefix, as_text(reload_id)) if reload_id else None


def weights(client: Any, prefix: str, alias: str) -> dict[str, Any] | None:
    """The weights the model was last rolled to ({path (under `paths.models_root`), reload, since}), or None: its
    configured ones."""
    raw = client.hgetall(model_weights_key(prefix, alias))
    if not raw:
        return None
    found = {as_text(k): as_text(v) for k, v in raw.items()}
    return {"path": found["path"], "reload": found.get("reload") or None, "since": float(found.get("since") or 0)}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A reload as the API shows it."""
    return {
        "id": record["id"],
        "object": "model.reload",
        "model": record["model"],
        "path": record["path"],
        "status": record["status"],
        "created_at": record["created_at"],
        "started_at": record.get("started_at"),
        "completed_at": record.get("completed_at"),
        "workers": record["workers"],
        "error": record.get("error"),
    }


def wake(client: Any, prefix: str, record: dict[str, Any]) -> None:
    """Push a `drive` task onto the own queue of each worker still waiting in the reload (when that queue is
    empty): an idle worker then takes its turn at once instead of at its next heartbeat."""
    for w in record["workers"]:
        if w["state"] in ENDED or not w.get("node"):
            continue
        push_drive(client, prefix, w["node"])


def hand_back(store: Any, job_ids: list[str], worker: str, model: str | None) -> int:
    """Hand running jobs back (lua/handback.lua): the next claim of an engine of `model` resumes them from their
    streamed tokens. How many were still this worker's."""
    run = store.client.register_script(script("handback"))
    now = time.time()
    fixed = [store.active_key(), store.held_key(worker), store.pending_key(model)]
    args = [worker, repr(now), repr(now + store.reap_after)]
    return sum(int(run(keys=[store.key(j), *fixed], args=args)) for j in job_ids)


# -- the workers' side ------------------------------------------------------------------------------------
def due(client: Any, prefix: str, alias: str, me: str) -> str | None:
    """The model's reload this worker should take its turn in now (it waits and the turn is free or its own)."""
    current = client.hget(model_reload_key(prefix, alias), "current")
    if not current:
        return None
    reload_id = as_text(current)
    record = get(client, prefix, reload_id)
    if record is None or record["status"] not in (QUEUED, RUNNING):
        return None
    mine = next((w for w in record["workers"] if w["worker"] == me), None)
    if mine is None or mine["state"] in ENDED:
        return None
    holder = client.get(reload_turn_key(prefix, reload_id))
    return reload_id if holder is None or as_text(holder) == me else None


def take_turn(client: Any, prefix: str, reload_id: str, me: str, lease: float) -> dict[str, Any] | None:
    """Hold the reload's turn (a lease of `lease` seconds) and start draining; the record, or None when
    another worker holds the turn or this worker has no part left in it."""
    turn = reload_turn_key(prefix, reload_id)
    if not client.set(turn, me, nx=True, px=int(lease * 1000)) and as_text(client.get(turn) or b"") != me:
        return None

    def start(record: dict[str, Any]) -> bool:
        mine = next((w for w in record["workers"] if w["worker"] == me), None)
        if record["status"] not in (QUEUED, RUNNING) or mine is None or mine["state"] in ENDED:
            return False
        mine.update(state=DRAINING, since=time.time())
        if record["status"] == QUEUED:
            record.update(status=RUNNING, started_at=time.time())
        return True

    record = _update(client, prefix, reload_id, start)
    if record is None:
        client.delete(turn)
    return record


def renew_turn(client: Any, prefix: str, reload_id: str, me: str, lease: float) -> None:
    turn = reload_turn_key(prefix, reload_id)
    if as_text(client.get(turn) or b"") == me:
        client.pexpire(turn, int(lease * 1000))


def worker_state(client: Any, prefix: str, reload_id: str, me: str, state: str, **fields: Any) -> None:
    """Record this worker's progress in the reload (`draining`, `loading`, with e.g. `handed_back`)."""

    def change(record: dict[str, Any]) -> bool:
        mine = next((w for w in record["workers"] if w["worker"] == me), None)
        if mine is None:
            return False
        mine.update(state=state, since=time.time(), **fields)
        return True

    _update(client, prefix, reload_id, change)


def end_turn(
    client: Any, prefix: str, reload_id: str, me: str, error: str | None, weights_of: dict[str, Any] | None, ttl: int
) -> dict[str, Any] | None:
    """This worker's turn is over: it serves the new weights (`error` None; `weights_of` {path, since}), or its
    load failed with `error` and the reload fails. Ends the reload when no live worker waits; frees the turn."""

    def done(record: dict[str, Any]) -> bool:
        mine = next((w for w in record["workers"] if w["worker"] == me), None)
        if mine is None:
            return False
        now = time.time()
        if error is None:
            mine.update(state=SUCCEEDED, since=now)
        else:
            mine.update(state=FAILED, since=now, error=error)
            _close(record, FAILED, {"code": "reload_failed", "message": f"worker {me}: {error}"})
        return True

    if error is None and weights_of is not None:
        client.hset(
            model_weights_key(prefix, weights_of["model"]),
            mapping={"path": weights_of["path"], "reload": reload_id, "since": repr(weights_of["since"])},
        )
    record = _update(client, prefix, reload_id, done)
    client.delete(reload_turn_key(prefix, reload_id))
    settled = settle(client, prefix, reload_id, ttl) if record is not None else None
    if settled is not None and settled["status"] in (QUEUED, RUNNING):
        wake(client, prefix, settled)
    return settled


def settle(client: Any, prefix: str, reload_id: str, ttl: int) -> dict[str, Any] | None:
    """Mark waiting workers that are no longer live `gone`; end the reload when none waits. The record."""
    record = get(client, prefix, reload_id)
    if record is None:
        return None
    if record["status"] in (QUEUED, RUNNING) and client.get(reload_turn_key(prefix, reload_id)) is None:
        now = time.time()
        live = {as_text(w) for w in client.zrangebyscore(model_workers_key(prefix, record["model"]), now, "+inf")}

        def prune(rec: dict[str, Any]) -> bool:
            if rec["status"] not in (QUEUED, RUNNING):
                return False
            changed = False
            for w in rec["workers"]:
                if w["state"] not in ENDED and w["worker"] not in live:
                    w.update(state=GONE, since=now)
                    changed = True
            if all(w["state"] in ENDED for w in rec["workers"]):
                ok = any(w["state"] == SUCCEEDED for w in rec["workers"])
                error = None if ok else {"code": "no_workers", "message": "no worker of the model is left to reload"}
                _close(rec, SUCCEEDED if ok else FAILED, error)
                changed = True
            return changed

        record = _update(client, prefix, reload_id, prune) or record
    if record["status"] in (SUCCEEDED, FAILED):
        pipe = client.pipeline()
        pipe.expire(reload_key(prefix, reload_id), ttl)
        pipe.hdel(model_reload_key(prefix, record["model"]), "current")
        pipe.execute()
    return record


def _close(record: dict[str, Any], status: str, error: dict[str, str] | None) -> None:
    record.update(status=status, completed_at=time.time())
    if error is not None:
        record["error"] = error
    for w in record["workers"]:
        if w["state"] not in ENDED:
            w.update(state=SKIPPED, since=record["completed_at"])


def _update(
    client: Any, prefix: str, reload_id: str, change: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """Apply `change` to the record atomically (WATCH / MULTI); the new record, or None when it changed nothing."""
    key = reload_key(prefix, reload_id)
    while True:
        with client.pipeline() as pipe:
            try:
                pipe.watch(key)
                raw = pipe.hgetall(key)
                if not raw:
                    return None
                record = _decode({as_text(k): as_text(v) for k, v in raw.items()})
                if not change(record):
                    return None
                pipe.multi()
                pipe.hset(key, mapping=_encode(record))
                pipe.execute()
                return record
            except WatchError:
                continue


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    record: dict[str, Any] = dict(raw)
    record["workers"] = json.loads(raw.get("workers") or "[]")
    record["error"] = json.loads(raw["error"]) if raw.get("error") else None
    for name in ("created_at", "started_at", "completed_at"):
        record[name] = float(raw[name]) if raw.get(name) else None
    return record


def _encode(record: dict[str, Any]) -> dict[str, str]:
    out = {k: v for k, v in record.items() if k not in ("workers", "error") and v is not None}
    out = {k: repr(v) if isinstance(v, float) else str(v) for k, v in out.items()}
    out["workers"] = json.dumps(record["workers"])
    if record.get("error") is not None:
        out["error"] = json.dumps(record["error"])
    return out
