"""Writing the export: safetensors shards streamed one tensor at a time, index, config, tokenizer.

The safetensors layout is written directly (8-byte header length, JSON header, raw data) so
that only one tensor is in memory at a time; validation reads every shard back with the
``safetensors`` library and ``from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from conversion.errors import ConversionError
from conversion.tensors import SAFETENSORS_DTYPES, ReleaseEvery, TensorRef

ST_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SUPPORT_FILES = (  # copied from the checkpoint's own HF folder if it has them, else from the base
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class ExportPlan:
    """The final tensors (base names, base order) and the floating dtype they are written in."""

    tensors: dict[str, TensorRef]
    dtype: torch.dtype

    def target(self, key: str) -> torch.dtype:
        own = self.tensors[key].dtype
        return self.dtype if own.is_floating_point else own

    def nbytes(self, key: str) -> int:
        return self.tensors[key].cast_nbytes(self.target(key))

    def load(self, key: str) -> torch.Tensor:
        ref = self.tensors[key]
        t = ref.load()
        if tuple(t.shape) != ref.shape:
            raise ConversionError(f"{key}: loaded shape {tuple(t.shape)} differs from the recorded {ref.shape}")
        return t.detach().to(self.target(key))


@dataclass(frozen=True)
class Shard:
    name: str
    keys: list[str]
    nbytes: int


def plan_shards(plan: ExportPlan, max_bytes: int) -> list[Shard]:
    """Consecutive groups of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in plan.tensors:
        n = plan.nbytes(key)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    total = len(groups)
    names = [SINGLE_NAME] if total == 1 else [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    return [Shard(name, keys, sum(plan.nbytes(k) for k in keys)) for name, keys in zip(names, groups, strict=True)]


def write_shards(
    out: Path, plan: ExportPlan, shards: list[Shard], release: ReleaseEvery, tick: Callable[[int], None]
) -> None:
    for shard in shards:
        _write_safetensors(out / shard.name, shard.keys, plan, release, tick)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in shards)},
            "weight_map": {k: s.name for s in shards for k in s.keys},
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_safetensors(
    path: Path, keys: list[str], plan: ExportPlan, release: ReleaseEvery, tick: Callable[[int], None]
) -> None:
    if sys.byteorder != "little":
        raise ConversionError("safetensors export needs a little-endian machine")
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        n = plan.nbytes(key)
        header[key] = {
            "dtype": ST_NAMES[plan.target(key)],
            "shape": list(plan.tensors[key].shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    try:
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key in keys:
                t = plan.load(key)
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
                release.spend(plan.nbytes(key))
                tick(plan.nbytes(key))
    except OSError as e:
        raise ConversionError(f"writing {path} failed: {e}") from None


def write_support_files(out: Path, sources: list[Path], dtype: torch.dtype) -> dict[str, str]:
    """config.json (with ``dtype``) from the first source that has one, then generation and
    tokenizer files from the first source that has each; returns name → where from."""
    config_dir = next(d for d in sources if (d / "config.json").is_file())
    config = json.loads((config_dir / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = {"config.json": str(config_dir)}
    for fname in SUPPORT_FILES:
        src = next((d / fname for d in sources if (d / fname).is_file()), None)
        if src is not None:
            shutil.copy2(src, out / fname)
            copied[fname] = str(src.parent)
    return copied
