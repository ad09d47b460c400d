"""Models registered at runtime: a merged export served under a new alias (`qwen-deploy export --serve-as`, the
export job's `serve_as`) without editing the config or restarting anything.

A registration is one field of a Redis hash, alias -> {path, registered_at, source}. The web tier routes the
alias from then on (a request naming it is queued on the alias's own queues, `interactive.ALIAS` and
`bulk.ALIAS`, like any non-default model's); a generation worker started with `qwen-deploy worker --model ALIAS`
reads the path from the registration and serves it, with the default model's device, dtype and threads. Config's
`models` come first: a registered alias can never shadow a configured name, and registering a taken name fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from qwen_deploy.adapters import adapter_name_taken
from qwen_deploy.config import ModelSettings, Settings
from qwen_deploy.keys import runtime_models_key
from qwen_deploy.served import Served, for_worker, served_models


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def served_entry(settings: Settings, alias: str, record: dict[str, Any]) -> Served:
    """A registered model as a served model: the default model's runtime settings, the registered path."""
    base = settings.model.model_dump(exclude={"name_or_path", "revision", "adapters", "trust_remote_code"})
    model = ModelSettings(**base, name_or_path=str(record["path"]))
    return Served(alias, model, False, (alias,))


def check_model_dir(path: Path) -> None:
    """Raise ValueError saying why `path` is not a Hugging Face model directory that a worker can load."""
    if not path.is_dir():
        raise ValueError("the model path is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError("no config.json in the model directory")
    if not any(path.glob("*.safetensors")):
        raise ValueError("no .safetensors weights in the model directory")


def register_model(client: Any, settings: Settings, alias: str, path: Path, source: str = "") -> bool:
    """Serve the model directory `path` as `alias`; False (nothing changed) when the name is already taken."""
    if adapter_name_taken(client, settings, alias):
        return False
    record = {"path": str(path), "registered_at": time.time(), "source": source}
    return bool(client.hsetnx(runtime_models_key(settings.key_prefix), alias, json.dumps(record)))


def unregister_model(client: Any, settings: Settings, alias: str) -> bool:
    """Stop routing `alias` (its workers keep running until stopped); False when it was not registered."""
    return bool(client.hdel(runtime_models_key(settings.key_prefix), alias))


def runtime_records(client: Any, settings: Settings) -> dict[str, dict[str, Any]]:
    """Every registration, alias -> record, in alias order."""
    raw = client.hgetall(runtime_models_key(settings.key_prefix)) if client is not None else {}
    return {_text(k): json.loads(v) for k, v in sorted(raw.items(), key=lambda kv: _text(kv[0]))}


def runtime_models(client: Any, settings: Settings) -> list[Served]:
    """Every registered model (none that a configured name shadows), in alias order."""
    taken = {n for m in served_models(settings) for n in m.names}
    return [served_entry(settings, a, r) for a, r in runtime_records(client, settings).items() if a not in taken]


def find_runtime(client: Any, settings: Settings, name: str) -> Served | None:
    """The registered model `name`, or None."""
    if client is None or any(name in m.names for m in served_models(settings)):
        return None
    raw = client.hget(runtime_models_key(settings.key_prefix), name)
    return served_entry(settings, name, json.loads(raw)) if raw else None


def worker_model(settings: Settings, consumed: set[str] | None, client: Any) -> Served:
    """The model a generation worker serves: as `served.for_worker` says, or the registered model that
    `worker.model` names. Raises ValueError for an alias that is neither configured nor registered."""
    try:
        return for_worker(settings, consumed)
    except ValueError as exc:
        alias = settings.worker.model
        found = find_runtime(client, settings, alias) if alias else None
        if found is None:
            raise ValueError(f"{exc}, and no model is registered at runtime under that name") from None
        return found
