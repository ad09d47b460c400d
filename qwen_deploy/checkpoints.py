"""Whether a model directory can replace a served model's weights (`POST /v1/models/{id}/reload`).

Read from the files' headers only (no torch, no pickle), so the web layer answers a 422 saying why before any
worker is told to load: the directory holds a `config.json` and safetensors weights, its architecture, vocabulary
and layer shapes are the served model's, and, when the served weights are a local directory too, its tensor
table (names and shapes) is theirs. Data that cannot be read past the headers fails the reload on its first
worker, which keeps serving the old weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAX_HEADER = 64 << 20
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "tie_word_embeddings",
)


class CheckpointError(ValueError):
    """The directory cannot replace the served weights; the message says why."""


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name -> {dtype, shape, data_offsets}), its metadata left out;
    ValueError naming the file when it is not one."""
    name = path.name
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{name} is not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER:
                raise ValueError(f"{name} is not a safetensors file (header of {size} bytes)")
            table = json.loads(f.read(size))
    except OSError as exc:
        raise ValueError(f"cannot read {name}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if str(exc).startswith(name):
            raise
        raise ValueError(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(table, dict):
        raise ValueError(f"{name} is not a safetensors file")
    table.pop("__metadata__", None)
    return table


def read_config(path: Path) -> dict[str, Any]:
    """A model directory's config.json; CheckpointError saying why it is not a model directory."""
    if not path.is_dir():
        raise CheckpointError("the path is not a directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError("no config.json in the directory (not a Hugging Face model directory)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"config.json cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json must hold a JSON object")
    return config


def tensor_table(path: Path) -> dict[str, list[int]]:
    """Every weight tensor of a model directory's safetensors files: name -> shape."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = "pickle .bin weights, not loaded" if any(path.glob("*.bin")) else "none"
        raise CheckpointError(f"no safetensors weights in the directory (found {found})")
    table: dict[str, list[int]] = {}
    for file in files:
        try:
            header = safetensors_header(file)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        for name, entry in header.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not isinstance(shape, list):
                raise CheckpointError(f"{file.name}: tensor {name!r} has no shape")
            table[name] = [int(x) for x in shape]
    return table


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def check_checkpoint(path: Path, served_path: str) -> dict[str, Any]:
    """Check that the model directory `path` can replace the weights at `served_path` (a directory, or a hub id
    whose files are not on disk: then only the new directory itself is checked). Returns its config."""
    config = read_config(path)
    table = tensor_table(path)
    current_dir = Path(served_path).expanduser()
    try:
        current = read_config(current_dir)
    except CheckpointError:
        return config  # a hub id: nothing on disk to compare with
    arch, served_arch = config.get("architectures"), current.get("architectures")
    if arch != served_arch:
        raise CheckpointError(f"the checkpoint is a {arch} model; the served model is a {served_arch} model")
    new, old = _text_config(config), _text_config(current)
    for key in SHAPE_KEYS:  # a key one side leaves to its default is not compared
        if key in new and key in old and new[key] != old[key]:
            raise CheckpointError(
                f"config.json: {key} is {new.get(key)!r}; the served model's is {old.get(key)!r} (another model)"
            )
    try:
        served_table = tensor_table(current_dir)
    except CheckpointError:
        return config
    missing = sorted(set(served_table) - set(table))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} of the served model's tensors ({missing[0]}, ...)")
    extra = sorted(set(table) - set(served_table))
    if extra:
        raise CheckpointError(f"the checkpoint has tensors the served model does not ({extra[0]}, ...)")
    for name, shape in table.items():
        if served_table[name] != shape:
            raise CheckpointError(f"tensor {name} has shape {shape}; the served model's has {served_table[name]}")
    return config
