"""verl FSDP actor checkpoints: ``model_world_size_{N}_rank_{r}.pt`` per rank, DTensors inside.

Each rank file holds its local piece of every tensor; ``Shard(d)`` pieces are concatenated on
``d`` in mesh order (uneven pieces included), ``Replicate`` ones taken once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from conversion.errors import ConversionError
from conversion.source import Checkpoint
from conversion.tensors import FileCache, TensorRef, torch_load

if TYPE_CHECKING:
    from conversion.base import BaseModel

RANK_FILE = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")
ACTOR_DIRS = ("", "actor")  # the actor dir itself, or a verl global_step_N dir holding actor/


def detect_verl(p: Path) -> Path | None:
    if not p.is_dir():
        return None
    for sub in ACTOR_DIRS:
        d = p / sub
        if (d / "fsdp_config.json").is_file() or any(RANK_FILE.fullmatch(f.name) for f in d.glob("model_world_size_*")):
            return d
    return None


def load_verl(d: Path, base: BaseModel) -> Checkpoint:
    world_size = _world_size(d)
    files = [d / f"model_world_size_{world_size}_rank_{r}.pt" for r in range(world_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(
            f"{d}: missing FSDP rank file(s) {', '.join(missing)} (world size {world_size}); "
            "every rank's file is needed to rebuild the full weights",
            "missing_shard",
        )
    cache = FileCache(torch_load)
    states = [cache.get(f) for f in files]
    for f, state in zip(files, states, strict=True):
        if set(state) != set(states[0]):
            odd = sorted(set(state) ^ set(states[0]))[:5]
            raise ConversionError(f"{f.name} and {files[0].name} hold different tensors, e.g. {odd}")
    refs = {
        key: _merged_ref(key, value, files, cache)
        for key, value in states[0].items()
        if isinstance(value, torch.Tensor)
    }
    cache.release()
    hf_dir = d / "huggingface"
    return Checkpoint(
        "verl-fsdp",
        d,
        refs,
        [cache],
        hf_dir=hf_dir if (hf_dir / "config.json").is_file() else None,
        details={"world_size": world_size},
    )


def _world_size(d: Path) -> int:
    found = {int(m.group(1)) for f in d.iterdir() if (m := RANK_FILE.fullmatch(f.name))}
    config = d / "fsdp_config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text())["world_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{config}: no usable world_size ({e})") from None
    if len(found) != 1:
        raise ConversionError(
            f"{d}: expected model_world_size_N_rank_R.pt files of one world size, found {sorted(found)}"
        )
    return found.pop()


def _merged_ref(key: str, value: torch.Tensor, files: list[Path], cache: FileCache) -> TensorRef:
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return TensorRef(tuple(value.shape), value.dtype, _local_loader(cache, files[0], key))
    dim, ranks = _layout(key, value)
    if max(ranks) >= len(files):
        raise ConversionError(f"{key}: its device mesh names rank {max(ranks)} but the world size is {len(files)}")
    return TensorRef(
        tuple(value.shape), value.dtype, _gather_loader(cache, [files[r] for r in ranks], key, dim, tuple(value.shape))
    )


def _layout(key: str, value: Any) -> tuple[int | None, list[int]]:
    """(tensor dim to concatenate on or None, ranks whose pieces to take in order)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = value.device_mesh.mesh
    sharded = [(i, p.dim) for i, p in enumerate(value.placements) if type(p) is Shard]
    unsupported = [p for p in value.placements if type(p) not in (Shard, Replicate)]
    if unsupported or len(sharded) > 1:
        raise ConversionError(
            f"{key}: unsupported DTensor placements {tuple(value.placements)}; only one Shard(dim) "
            "(plus Replicate) is handled, not _StridedShard/Partial or nested sharding",
            "unsupported_placement",
        )
    if not sharded:
        return None, [int(mesh.flatten()[0])]
    mesh_dim, dim = sharded[0]
    return dim, [int(r) for r in mesh.movedim(mesh_dim, 0).reshape(mesh.shape[mesh_dim], -1)[:, 0]]


def _local_loader(cache: FileCache, f: Path, key: str) -> Callable[[], torch.Tensor]:
    return lambda: cache.get(f)[key]


def _gather_loader(
    cache: FileCache, files: list[Path], key: str, dim: int | None, shape: tuple[int, ...]
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        pieces = [cache.get(f)[key].to_local() for f in files]
        full = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
        if tuple(full.shape) != shape:
            raise ConversionError(
                f"{key}: rank pieces {[tuple(p.shape) for p in pieces]} concatenate to {tuple(full.shape)}, "
                f"not the recorded global shape {shape}; the rank files do not belong together"
            )
        return full

    return load
