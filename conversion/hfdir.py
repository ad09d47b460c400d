"""Weights of a Hugging Face model directory: safetensors or ``pytorch_model*.bin``, sharded or not."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from conversion.errors import ConversionError, inside
from conversion.tensors import FileCache, TensorRef, safe_open_file, safetensors_refs, torch_load, torch_refs

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
NOT_MODEL_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def hf_weight_files(d: Path) -> list[Path]:
    """The weight files of ``d`` (the index's shards when there is one); [] when it has none."""
    for index_name in INDEX_FILES:
        index = d / index_name
        if index.is_file():
            return _indexed_files(index)
    for pattern in WEIGHT_GLOBS:
        files = sorted(f for f in d.glob(pattern) if f.name not in NOT_MODEL_WEIGHTS)
        if files:
            return files
    return []


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: not a valid shard index ({e})") from None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: not a valid shard index (weight_map is not an object)")
    for name in weight_map.values():  # before any file is opened: never one outside the checkpoint
        inside(index.parent, name, index)
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise ConversionError(
            f"{index.parent}: missing shard file(s) listed in {index.name}: {', '.join(missing)} "
            f"({len(missing)} of {len(names)}); the checkpoint is incomplete",
            "missing_shard",
        )
    return [index.parent / n for n in names]


def hf_refs(files: list[Path]) -> tuple[dict[str, TensorRef], list[FileCache]]:
    """Lazy refs for every tensor in ``files``, and the caches that hold those files open."""
    st_cache, pt_cache = FileCache(safe_open_file), FileCache(torch_load)
    refs: dict[str, TensorRef] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = safetensors_refs(f, st_cache)
        else:
            part = torch_refs(pt_cache.get(f), pt_cache, f, _identity)
        clash = refs.keys() & part.keys()
        if clash:
            raise ConversionError(f"{f}: tensor(s) also found in another shard: {sorted(clash)[:5]}")
        refs.update(part)
    _check_index(files, refs)
    st_cache.release()
    pt_cache.release()
    return refs, [st_cache, pt_cache]


def _identity(obj: Any) -> Mapping[str, Any]:
    """A plain state dict is its own mapping of tensors."""
    return cast(Mapping[str, Any], obj)


def _check_index(files: list[Path], refs: dict[str, TensorRef]) -> None:
    index = next((files[0].parent / n for n in INDEX_FILES if (files[0].parent / n).is_file()), None)
    if index is None:
        return
    listed = set(json.loads(index.read_text())["weight_map"])
    absent = sorted(listed - refs.keys())
    if absent:
        raise ConversionError(
            f"{index}: {len(absent)} tensor(s) listed in the index are not in the shards, e.g. "
            f"{', '.join(absent[:5])}; the checkpoint is incomplete or corrupted",
            "missing_shard",
        )
