"""The models a deployment serves: `models:` in config, or the single `model:` section as one entry.

Each model has an alias (its id in `model` fields and /v1/models), the names that select it, and its
own queues and engine pending set. The first model is the default: it keeps the plain queue names
(`interactive`, `bulk`) and pending key, so a deployment of one model looks as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen_deploy.config import ModelSettings, Settings
from qwen_deploy.queues import model_queues


@dataclass(frozen=True)
class Served:
    alias: str
    model: ModelSettings
    default: bool
    names: tuple[str, ...]  # every name that selects it, the alias first

    @property
    def interactive(self) -> str:
        return model_queues(self.alias, self.default)[0]

    @property
    def bulk(self) -> str:
        return model_queues(self.alias, self.default)[1]

    @property
    def queues(self) -> tuple[str, str]:
        return model_queues(self.alias, self.default)


def legacy_names(path: str) -> list[str]:
    """The names of the single `model:` section: its public id first (a local directory's name, else the
    hub id), then the other spelling."""
    local = Path(path).expanduser().exists() or path.startswith(("/", ".", "~"))
    return [Path(path).name, path] if local else [path, path.rsplit("/", 1)[-1]]


_SERVED: dict[int, tuple[Settings, list[Served]]] = {}  # by settings object: every request asks


def served_models(settings: Settings) -> list[Served]:
    """Every served model, the default first. `web.model_aliases` are more names of the default. Read once
    per settings object (settings are not changed once in use)."""
    cached = _SERVED.get(id(settings))
    if cached is not None and cached[0] is settings:
        return cached[1]
    found = _served_models(settings)
    if len(_SERVED) >= 16:
        _SERVED.clear()
    _SERVED[id(settings)] = (settings, found)
    return found


def _served_models(settings: Settings) -> list[Served]:
    extra = settings.web.model_aliases
    if not settings.models:
        names = legacy_names(settings.model.name_or_path)
        return [Served(names[0], settings.model, True, tuple(dict.fromkeys([*names, *extra])))]
    return [
        Served(m.alias, m, i == 0, tuple(dict.fromkeys([m.alias, *(extra if i == 0 else [])])))
        for i, m in enumerate(settings.models)
    ]


def find_model(settings: Settings, name: str | None) -> Served | None:
    """The model `name` selects (None: the default), or None when no model has that name."""
    models = served_models(settings)
    if name is None:
        return models[0]
    return next((m for m in models if name in m.names), None)


def default_alias(settings: Settings) -> str:
    return served_models(settings)[0].alias


def all_generation_queues(settings: Settings) -> set[str]:
    """Every configured model's queues, and those of `worker.model` when it names a model registered at runtime
    (qwen_deploy/runtime_models.py: never the default, so its queues are `interactive.ALIAS`, `bulk.ALIAS`)."""
    found = {q for m in served_models(settings) for q in m.queues}
    alias = settings.worker.model
    if alias is not None and find_model(settings, alias) is None:
        found |= set(model_queues(alias, False))
    return found


def for_worker(settings: Settings, consumed: set[str] | None = None) -> Served:
    """The model a generation worker serves: `worker.model`, else the one whose queues it consumes, else
    the default. Raises ValueError for an unknown alias."""
    models = served_models(settings)
    if settings.worker.model is not None:
        found = next((m for m in models if m.alias == settings.worker.model), None)
        if found is None:
            raise ValueError(
                f"worker.model {settings.worker.model!r} is not an alias of `models` "
                f"({', '.join(m.alias for m in models)})"
            )
        return found
    return next((m for m in models if consumed and set(m.queues) & consumed), models[0])
