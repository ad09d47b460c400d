"""LoRA adapters served per request: what a PEFT adapter directory holds, whether it fits a base model, and
where the adapters of each model are registered (config, plus those loaded at runtime, kept in Redis).

A PEFT adapter is `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, `use_rslora`, ...) and
`adapter_model.safetensors` with `base_model.model.<module path>.lora_A.weight` [r, in] and `lora_B.weight`
[out, r]. Everything here reads the files' headers only (no torch, no pickle): the web layer checks an
adapter before every worker of its model is told to load it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_deploy.checkpoints import safetensors_header
from qwen_deploy.config import Settings
from qwen_deploy.keys import adapters_key, adapters_version_key, runtime_models_key
from qwen_deploy.served import Served, served_models

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MAX_RANK = 64
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterError(ValueError):
    """The adapter cannot be served on this base; the message says why."""


@dataclass(frozen=True)
class AdapterModule:
    """One adapted projection: its module path, rank, scale, and the [r, in] / [out, r] shapes of A and B."""

    path: str
    rank: int
    scale: float
    a_key: str
    b_key: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter directory: its config and its modules."""

    path: Path
    config: dict[str, Any]
    modules: tuple[AdapterModule, ...]

    @property
    def base_name(self) -> str | None:
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None


def _header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name -> {dtype, shape, data_offsets})."""
    try:
        return safetensors_header(path)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"no {CONFIG_FILE} in the adapter directory") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{CONFIG_FILE}: peft_type {peft_type!r} is not served (only LORA)")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora) are not served")
    if config.get("modules_to_save"):
        raise AdapterError("adapters with modules_to_save (fully trained modules) are not served")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{CONFIG_FILE}: {name} must be a positive number")
    return config


def read_adapter(path: Path) -> AdapterFiles:
    """Check an adapter directory's config and tensor table (shapes only); raise AdapterError saying why."""
    if not path.is_dir():
        raise AdapterError("the adapter path is not a directory")
    config = _config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        found = "adapter_model.bin (pickle, not loaded)" if (path / "adapter_model.bin").exists() else "nothing"
        raise AdapterError(f"no {WEIGHTS_FILE} in the adapter directory (found {found})")
    parts: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, entry in _header(weights).items():
        match = KEY.match(key)
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if match is None or not isinstance(shape, list) or len(shape) != 2:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA A/B matrix of a linear layer")
        module = match["module"]
        if module.rsplit(".", 1)[-1] not in TARGETS:
            raise AdapterError(f"{WEIGHTS_FILE}: {module} is not an attention or MLP projection ({', '.join(TARGETS)})")
        parts.setdefault(module, {})[match["part"]] = (key, [int(x) for x in shape])
    if not parts:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA tensors")
    alphas = config.get("alpha_pattern") or {}
    modules = []
    for module, pair in sorted(parts.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{WEIGHTS_FILE}: {module} has {', '.join(pair)} but not both lora_A and lora_B")
        (a_key, (rank, fan_in)), (b_key, (fan_out, rank_b)) = pair["lora_A"], pair["lora_B"]
        if rank != rank_b or not 1 <= rank <= MAX_RANK:
            raise AdapterError(f"{module}: rank {rank} (B has {rank_b}); ranks from 1 to {MAX_RANK} are served")
        alpha = next(
            (a for pat, a in alphas.items() if re.fullmatch(rf"(?:.*\.)?(?:{pat})", module)), config["lora_alpha"]
        )
        scale = float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
        modules.append(AdapterModule(module, rank, scale, a_key, b_key, fan_in, fan_out))
    return AdapterFiles(path, config, tuple(modules))


def projection_shapes(base_config: dict[str, Any]) -> tuple[int, dict[str, tuple[int, int]]]:
    """A Qwen2/Llama-style config's layer count and each projection's (in, out) features."""
    text = base_config.get("text_config") or base_config
    try:
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        inter = int(text["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"the base model's config has no {exc} (not a Qwen2/Llama-style model)") from None
    q, kv = heads * head_dim, kv_heads * head_dim
    return layers, {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_base(adapter: AdapterFiles, base_config: dict[str, Any], base_names: list[str]) -> None:
    """Raise AdapterError when the adapter was trained on another base: its base_model_name_or_path names
    none of the base's names (compared by last path component), or a matrix does not fit a projection."""
    wanted = adapter.base_name
    if wanted is not None:
        names = {_last(n) for n in [*base_names, base_config.get("_name_or_path") or ""] if n}
        if _last(wanted) not in names:
            raise AdapterError(
                f"the adapter was trained on {wanted!r} (base_model_name_or_path); this model is "
                f"{', '.join(sorted(names))}"
            )
    layers, shapes = projection_shapes(base_config)
    for m in adapter.modules:
        kind = m.path.rsplit(".", 1)[-1]
        layer = LAYER.search(m.path)
        if layer is None or int(layer[1]) >= layers:
            raise AdapterError(f"{m.path}: no such layer in the base model ({layers} layers)")
        fan_in, fan_out = shapes[kind]
        if (m.in_features, m.out_features) != (fan_in, fan_out):
            raise AdapterError(
                f"{m.path}: the adapter maps {m.in_features} -> {m.out_features} features; the base model's "
                f"{kind} maps {fan_in} -> {fan_out} (an adapter for another base)"
            )


def _last(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def base_config_of(model_path: str) -> dict[str, Any] | None:
    """A local base model's config.json (None when it is a hub id not on disk)."""
    found = Path(model_path).expanduser() / "config.json"
    try:
        data = json.loads(found.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_adapter(path: Path, served: Served) -> AdapterFiles:
    """The adapter at `path`, checked against `served`'s base model; AdapterError saying why it cannot serve."""
    adapter = read_adapter(path)
    config = base_config_of(served.model.name_or_path)
    if config is not None:
        check_base(adapter, config, [served.model.name_or_path, *served.names])
    return adapter


# -- where adapters are registered ------------------------------------------------------------------
def config_adapters(settings: Settings, served: Served) -> dict[str, str]:
    """A model's `adapters` from config: name -> directory (relative ones under `paths.models_root`)."""
    root = settings.paths.models_root.expanduser()
    return {name: str(root / path) for name, path in served.model.adapters.items()}


def registered(client: Any, settings: Settings, served: Served) -> dict[str, str]:
    """Every adapter of a model: config's, then those loaded at runtime (name -> directory)."""
    live = {_text(k): _text(v) for k, v in client.hgetall(adapters_key(settings.key_prefix, served.alias)).items()}
    return {**config_adapters(settings, served), **live}


def register(client: Any, settings: Settings, served: Served, name: str, path: Path | None) -> None:
    """Serve adapter `name` from `path` on `served` (None: stop serving it); every worker of the model syncs."""
    pipe = client.pipeline()
    if path is None:
        pipe.hdel(adapters_key(settings.key_prefix, served.alias), name)
    else:
        pipe.hset(adapters_key(settings.key_prefix, served.alias), name, str(path))
    pipe.incr(adapters_version_key(settings.key_prefix))
    pipe.execute()


def fitting_model(path: Path, settings: Settings, named: str | None = None) -> Served:
    """The served model the adapter at `path` is for: `named` (an alias), else the first it fits. Raises
    LookupError for an unknown `named`, AdapterError saying why it fits none."""
    models = served_models(settings)
    candidates = [m for m in models if named is None or named in m.names]
    if not candidates:
        raise LookupError(f"the model {named!r} does not exist")
    reasons = []
    for served in candidates:
        try:
            check_adapter(path, served)
            return served
        except AdapterError as exc:
            reasons.append(f"{served.alias}: {exc}" if len(candidates) > 1 else str(exc))
    raise AdapterError("the adapter cannot be served: " + "; ".join(reasons))


def adapter_name_taken(client: Any, settings: Settings, name: str) -> bool:
    """Whether `name` already selects a model (configured or registered at runtime) or an adapter."""
    if any(name in m.names for m in served_models(settings)):
        return True
    if client is not None and client.hexists(runtime_models_key(settings.key_prefix), name):
        return True
    return find_adapter(client, settings, name) is not None


def find_adapter(client: Any, settings: Settings, name: str) -> Served | None:
    """The base model serving the adapter `name`, or None."""
    for served in served_models(settings):
        if name in served.model.adapters:
            return served
    if client is None:
        return None
    pipe = client.pipeline(transaction=False)
    models = served_models(settings)
    for served in models:
        pipe.hexists(adapters_key(settings.key_prefix, served.alias), name)
    return next((m for m, hit in zip(models, pipe.execute()) if hit), None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
