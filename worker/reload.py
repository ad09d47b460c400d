"""A worker's turn in a model reload (qwen_deploy/reloads.py), driven between engine steps by worker/driver.py.

When its turn is due the worker stops claiming and lets its running jobs finish on the old weights for
`engine.reload_drain_seconds`; then it hands the rest back (lua/handback.lua: they resume from their streamed
tokens, on another worker of the model or on this one once it has the new weights). Once the engine is empty
the next driving task loads the new weights at its start (a whole time slice for the load) into a new handler
and engine; the old ones serve until that load succeeded, and keep serving when it fails.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen_deploy import reloads
from qwen_deploy.config import Settings
from qwen_deploy.logs import event
from qwen_deploy.model_load import load_error
from qwen_deploy.paths import confine
from worker.handler import ModelHandler

log = logging.getLogger(__name__)
CHECK_EVERY = 0.05  # seconds between looks for a reload whose turn is due (one HGET while none is)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Turn:
    reload_id: str
    path: str
    hand_back_at: float  # monotonic time after which running jobs are handed back
    handed_back: int = 0


def load_checkpoint(handler: ModelHandler, path: str) -> ModelHandler:
    """A new handler on the weights at `path`, checked strictly (every tensor of the model, no other); the
    served tokenizer when the directory has none, the served model's names for its adapters' checks."""
    has_tokenizer = any((Path(path) / name).exists() for name in TOKENIZER_FILES)
    settings = handler.settings
    model = settings.model.model_copy(update={"name_or_path": path, "revision": None})
    names = (settings.model.name_or_path, *handler.names)
    new = ModelHandler(
        settings.model_copy(update={"model": model}),
        tokenizer_path=None if has_tokenizer else handler.tokenizer_path,
        strict=True,
        names=names,
    )
    new.setup()
    return new


def resolve(settings: Settings, path: str) -> str:
    """A reload's path (relative to `paths.models_root`) under this worker's own root, confined to it."""
    return str(confine(settings.paths.models_root, path, "path", must_exist=True))


def release(handler: ModelHandler) -> None:
    """Let go of a replaced model's memory now rather than at the next collection."""
    handler.model = handler.adapters = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Reloader:
    """One worker's part in its model's reloads."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.turn: Turn | None = None
        self.next_check = 0.0

    @property
    def lease(self) -> float:
        """How long a turn stays this worker's without a renewal (a load happens without renewals)."""
        return float(self.driver.settings.limits.hard_time_limit) + 60.0

    @property
    def ready(self) -> bool:
        """In a turn with nothing left in the engine: the new weights can load."""
        d = self.driver
        return self.turn is not None and not (len(d.engine) or d.to_finish or d.units)

    def due(self) -> bool:
        """Whether this worker is in a reload's turn now (taking it when it is due)."""
        return self.turn is not None or self.check(force=True)

    def check(self, force: bool = False) -> bool:
        """Between steps: take this worker's turn when it is due; in it, hand back what still runs once the
        drain time is over. True while in a turn (the engine claims nothing)."""
        d = self.driver
        now = time.monotonic()
        if d.served is None or (not force and now < self.next_check):
            return self.turn is not None
        self.next_check = now + CHECK_EVERY
        client, prefix, me = d.client, d.settings.key_prefix, d.worker
        if self.turn is None:
            reload_id = reloads.due(client, prefix, d.served.alias, me)
            record = reloads.take_turn(client, prefix, reload_id, me, self.lease) if reload_id else None
            if record is None:
                return False
            self.turn = Turn(reload_id, record["path"], now + d.settings.engine.reload_drain_seconds)  # type: ignore[arg-type]
            event(log, "model.reload.draining", id=reload_id, worker=me, path=record["path"], running=len(d.jobs))
        else:
            reloads.renew_turn(client, prefix, self.turn.reload_id, me, self.lease)
        if d.jobs and now >= self.turn.hand_back_at:
            self.hand_back()
        return True

    def hand_back(self) -> None:
        """Publish what every running job streamed, then hand them back to resume from it."""
        d, turn = self.driver, self.turn
        assert turn is not None
        d.flush()
        count = reloads.hand_back(d.store, list(d.jobs), d.worker, d.model)
        for job in d.jobs.values():
            job.lost = True
            for seq in job.seqs:
                seq.canceled = True
        turn.handed_back += count
        client, prefix = d.client, d.settings.key_prefix
        reloads.worker_state(client, prefix, turn.reload_id, d.worker, reloads.DRAINING, handed_back=turn.handed_back)
        event(log, "model.reload.handed_back", id=turn.reload_id, worker=d.worker, jobs=count)

    def through(self, slice_end: float) -> None:
        """Before a micro-batch starts: in a turn, drain (handing back what runs past the drain time) and load the
        new weights first, so the micro-batch runs on them and is never handed back."""
        if self.turn is None:
            return
        if not self.ready:
            self.driver.drive(lambda: True, slice_end)  # steps until the engine is drained (or the slice ends)
        if self.ready:
            self.swap()

    def serve(self, handler: ModelHandler, revision: dict[str, Any]) -> None:
        """Serve new weights: a new engine on them (its prefix cache empty), adapters synced again, the process
        told (its handler, revision and registry record)."""
        d = self.driver
        d.handler, d.engine = handler, handler.engine()
        d.adapters_synced = False
        d.sync_adapters(force=True)
        if d.on_swap is not None:
            d.on_swap(handler, revision)
        d.next_claim = 0.0

    def swap(self) -> str | None:
        """Load the turn's weights and serve them (the error when they do not load: the old ones serve on)."""
        d, turn = self.driver, self.turn
        assert turn is not None
        client, prefix, settings = d.client, d.settings.key_prefix, d.settings
        reloads.worker_state(client, prefix, turn.reload_id, d.worker, reloads.LOADING, handed_back=turn.handed_back)
        error: str | None = None
        weights: dict[str, Any] | None = None
        started = time.perf_counter()
        try:
            new = load_checkpoint(d.handler, resolve(settings, turn.path))
        except Exception as exc:  # a soft time limit too: the old weights serve on
            error = load_error(turn.path, exc, (settings.token,))["message"]
            log.warning("reload %s: %s; the old weights serve on", turn.reload_id, error, exc_info=True)
        else:
            assert new.info is not None
            old = d.handler
            revision = {"path": new.settings.model.name_or_path, "reload": turn.reload_id, "since": new.info.loaded_at}
            self.serve(new, revision)
            release(old)
            weights = {"model": d.served.alias, "path": turn.path, "since": new.info.loaded_at}
        self.turn = None
        reloads.end_turn(client, prefix, turn.reload_id, d.worker, error, weights, settings.limits.result_ttl)
        event(
            log,
            "model.reload.loaded" if error is None else "model.reload.failed",
            logging.INFO if error is None else logging.WARNING,
            id=turn.reload_id,
            worker=d.worker,
            path=turn.path,
            seconds=round(time.perf_counter() - started, 3),
            error=error,
        )
        return error
