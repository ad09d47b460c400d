"""Checkpoint layouts: a registry of detector → loader, tried in order.

A detector returns the directory/file to load (it may step into ``actor/`` or ``global_stepN/``)
or None; a loader turns it into a ``Checkpoint`` of lazily loaded, still raw-named tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch

from conversion.base import BaseModel
from conversion.errors import ConversionError, inside
from conversion.fsdp import detect_verl, load_verl
from conversion.hfdir import hf_refs, hf_weight_files
from conversion.source import Checkpoint
from conversion.tensors import (
    TORCH_SUFFIXES,
    FileCache,
    safe_open_file,
    safetensors_refs,
    torch_load,
    torch_refs,
)

NESTING_KEYS = ("module", "model", "state_dict")  # containers a state dict is often saved under
DS_MODEL_FILE = "mp_rank_00_model_states.pt"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Format:
    detect: Callable[[Path], Path | None]
    load: Callable[[Path, BaseModel], Checkpoint]


def open_checkpoint(path: Path, base: BaseModel) -> Checkpoint:
    """The first format whose detector accepts ``path``, loaded."""
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist")
    for fmt in FORMATS.values():
        found = fmt.detect(path)
        if found is not None:
            ckpt = fmt.load(found, base)
            ckpt.details.setdefault("resolved", str(found))
            return ckpt
    raise ConversionError(
        f"{path}: unrecognised checkpoint layout; expected one of: {', '.join(FORMATS)} "
        "(a HF model directory, verl model_world_size_N_rank_R.pt files, a DeepSpeed directory "
        f"with 'latest', a PEFT adapter directory, or one {'/'.join(TORCH_SUFFIXES)}/.safetensors file)",
        "unknown_format",
    )


# -- Hugging Face directory ---------------------------------------------------------------


def detect_hf(p: Path) -> Path | None:
    return p if p.is_dir() and hf_weight_files(p) else None


def load_hf(p: Path, base: BaseModel) -> Checkpoint:
    files = hf_weight_files(p)
    refs, caches = hf_refs(files)
    return Checkpoint("hf", p, refs, caches, details={"files": [f.name for f in files]})


# -- PEFT adapter directory ---------------------------------------------------------------


def detect_peft(p: Path) -> Path | None:
    has_weights = any((p / n).is_file() for n in ADAPTER_WEIGHTS)
    return p if p.is_dir() and (p / "adapter_config.json").is_file() and has_weights else None


def load_peft(p: Path, base: BaseModel) -> Checkpoint:
    """The adapter's LoRA tensors next to the base weights, named as in a PEFT model."""
    if base.weights is None:
        raise ConversionError(f"{p} is a LoRA adapter: the base {base.path} must hold the weights to merge it into")
    weights = next(p / n for n in ADAPTER_WEIGHTS if (p / n).is_file())
    adapter = _single_file_refs(weights)
    prefix = PEFT_PREFIX if all(k.startswith(PEFT_PREFIX) for k in adapter.tensors) else ""
    tensors = {prefix + k: ref for k, ref in base.weights.items()} | adapter.tensors
    return Checkpoint(
        "peft-adapter",
        p,
        tensors,
        adapter.caches,
        adapter_config=p / "adapter_config.json",
        details={"adapter_tensors": len(adapter.tensors)},
    )


# -- DeepSpeed (ZeRO <= 2), OpenRLHF --------------------------------------------------------


def detect_deepspeed(p: Path) -> Path | None:
    if not p.is_dir():
        return None
    if (p / DS_MODEL_FILE).is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        inside(p, tag, latest)
        if not (p / tag / DS_MODEL_FILE).is_file():
            raise ConversionError(f"{latest} names '{tag}' but {p / tag / DS_MODEL_FILE} is missing", "missing_shard")
        return p / tag
    steps = sorted(p.glob(f"global_step*/{DS_MODEL_FILE}"), key=lambda f: _step_number(f.parent.name))
    return steps[-1].parent if steps else None


def _step_number(name: str) -> int:
    digits = re.sub(r"\D", "", name)
    return int(digits) if digits else -1


def load_deepspeed(d: Path, base: BaseModel) -> Checkpoint:
    if (d / "mp_rank_01_model_states.pt").exists():
        raise ConversionError(f"{d}: model-parallel DeepSpeed checkpoints (mp_rank_01, ...) are not supported")
    path = d / DS_MODEL_FILE
    cache = FileCache(torch_load)
    state = cache.get(path)
    if not isinstance(state, Mapping) or not isinstance(state.get("module"), Mapping):
        raise ConversionError(f"{path}: no 'module' state dict (not a DeepSpeed model-states file?)")
    refs = torch_refs(state["module"], cache, path, _pick_module)
    empty = [k for k, r in refs.items() if r.shape == (0,)]
    if empty:
        raise ConversionError(
            f"{path} holds ZeRO-3 partitioned placeholders (shape (0,)) for {len(empty)} tensor(s), e.g. "
            f"{', '.join(empty[:3])}. Consolidate the shards first with the zero_to_fp32.py script DeepSpeed "
            f"saves next to the checkpoint (python zero_to_fp32.py {d.parent} OUTPUT) and export its output.",
            "zero3_checkpoint",
        )
    shared = dict(state.get("shared_params") or {})
    aliased = {name: target for name, target in shared.items() if name not in refs and target in refs}
    refs |= {name: refs[target] for name, target in aliased.items()}
    cache.release()
    return Checkpoint("deepspeed", d, refs, [cache], details={"tag": d.name, "shared_params": aliased})


def _pick_module(obj: Any) -> Mapping[str, Any]:
    return obj["module"]


# -- a single state-dict file ------------------------------------------------------------


def detect_file(p: Path) -> Path | None:
    return p if p.is_file() and p.suffix in (*TORCH_SUFFIXES, ".safetensors") else None


def load_file(p: Path, base: BaseModel) -> Checkpoint:
    return _single_file_refs(p)


def _single_file_refs(p: Path) -> Checkpoint:
    if p.suffix == ".safetensors":
        cache = FileCache(safe_open_file)
        refs = safetensors_refs(p, cache)
        cache.release()
        return Checkpoint("state-dict-file", p, refs, [cache])
    cache = FileCache(torch_load)
    obj = cache.get(p)
    path = _nesting_path(obj, p)
    state = reduce(lambda o, k: o[k], path, obj)
    if any(_is_dtensor(v) for v in state.values()):
        raise ConversionError(
            f"{p} holds one rank's shard of distributed (DTensor) weights; pass the directory with every rank's file"
        )
    refs = torch_refs(state, cache, p, lambda o: reduce(lambda a, k: a[k], path, o))
    cache.release()
    return Checkpoint("state-dict-file", p, refs, [cache], details={"nested_under": list(path)})


def _nesting_path(obj: Any, p: Path) -> tuple[str, ...]:
    """Keys leading from the loaded object to the state dict, e.g. ('module',)."""
    path: tuple[str, ...] = ()
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        path, obj = (*path, key), obj[key]
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{p}: no state dict of tensors found (looked under {', '.join(NESTING_KEYS)})")
    return path


def _is_dtensor(value: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


FORMATS: dict[str, Format] = {
    "peft-adapter": Format(detect_peft, load_peft),
    "verl-fsdp": Format(detect_verl, load_verl),
    "deepspeed": Format(detect_deepspeed, load_deepspeed),
    "hf": Format(detect_hf, load_hf),
    "state-dict-file": Format(detect_file, load_file),
}
