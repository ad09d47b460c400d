"""LoRA merging: W + (alpha / r) · B @ A for PEFT-named tensors, lazily, one module at a time.

Handles PEFT naming in a model's state dict (``q_proj.base_layer.weight``,
``q_proj.lora_A.default.weight``) and in a saved adapter (``q_proj.lora_A.weight``), embedding
LoRA (``lora_embedding_A/B``), ``use_rslora``, ``alpha_pattern`` and ``modules_to_save``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conversion.errors import ConversionError
from conversion.tensors import TensorRef

LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
REFUSED_PARTS = {"lora_magnitude_vector": "DoRA adapters (use_dora) are not supported"}
ADAPTER_CONFIG_DIRS = ("", "lora_adapter", "huggingface", "adapter")


@dataclass(frozen=True)
class LoraSettings:
    alpha: float
    source: str  # where alpha came from, for messages and the report
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def scale(self, module: str, rank: int) -> float:
        alpha = next(
            (a for pat, a in self.alpha_pattern.items() if re.fullmatch(rf"(?:.*\.)?(?:{pat})", module)), self.alpha
        )
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def has_lora(keys: Iterable[str]) -> bool:
    return any(_lora_part(k) is not None for k in keys)


def find_adapter_config(checkpoint: Path) -> Path | None:
    """An adapter_config.json next to (or in a usual subfolder of) the checkpoint."""
    root = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return next(
        (root / d / "adapter_config.json" for d in ADAPTER_CONFIG_DIRS if (root / d / "adapter_config.json").is_file()),
        None,
    )


def lora_settings(config_file: Path | None, lora_alpha: float | None) -> LoraSettings:
    """Settings from ``adapter_config.json``; ``lora_alpha`` (if given) overrides its alpha."""
    cfg: dict[str, Any] = json.loads(config_file.read_text()) if config_file else {}
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{config_file}: peft_type {cfg['peft_type']} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise ConversionError(f"{config_file}: {REFUSED_PARTS['lora_magnitude_vector']}")
    alpha = lora_alpha if lora_alpha is not None else cfg.get("lora_alpha")
    source = "the lora_alpha argument" if lora_alpha is not None else str(config_file)
    if alpha is None:
        raise ConversionError(
            "the checkpoint holds LoRA tensors but no adapter_config.json was found next to it: "
            "its lora_alpha is needed to merge them (place the adapter_config.json beside the "
            "checkpoint or pass lora_alpha)",
            "lora_alpha_missing",
        )
    pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
    if alpha == 0 or 0 in pattern.values():
        raise ConversionError(
            f"lora_alpha is 0 in {source}: the merge scale alpha/r would be 0 and the adapter "
            "silently dropped (verl writes lora_alpha 0 in its adapter_config.json); pass "
            "lora_alpha=<the value used in training>",
            "lora_alpha_zero",
        )
    return LoraSettings(float(alpha), source, bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out")), pattern)


def _lora_part(key: str) -> tuple[str, str, str | None] | None:
    """(module, part, adapter name) for a LoRA tensor key, else None."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in REFUSED_PARTS:
            raise ConversionError(f"{key}: {REFUSED_PARTS[p]}")
        if p in LORA_PARTS and i > 0:
            rest = [r for r in parts[i + 1 :] if r != "weight"]
            return ".".join(parts[:i]), p, rest[0] if rest else None
    return None


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of a checkpoint: its (raw) path and the keys of A, B and the base weight."""

    path: str
    a_key: str
    b_key: str
    base_key: str
    embedding: bool


def lora_modules(tensors: dict[str, TensorRef]) -> tuple[list[LoraModule], str]:
    """Every LoRA module of ``tensors`` (A, B and base weight found, or ConversionError) and the adapter name."""
    groups: dict[str, dict[str, str]] = {}
    adapters: set[str] = set()
    for key in tensors:
        found = _lora_part(key)
        if found:
            module, part, adapter = found
            groups.setdefault(module, {})[part] = key
            adapters |= {adapter} if adapter else set()
    if len(adapters) > 1:
        raise ConversionError(f"the checkpoint holds several LoRA adapters {sorted(adapters)}; export one at a time")
    modules = []
    for module, parts in groups.items():
        a_key = parts.get("lora_A") or parts.get("lora_embedding_A")
        b_key = parts.get("lora_B") or parts.get("lora_embedding_B")
        if a_key is None or b_key is None:
            raise ConversionError(
                f"{module}: LoRA A and B tensors must come in pairs, found only {sorted(parts.values())}"
            )
        base_key = next((k for k in (f"{module}.base_layer.weight", f"{module}.weight") if k in tensors), None)
        if base_key is None:
            raise ConversionError(f"{module}: LoRA tensors without a base weight ({module}.base_layer.weight)")
        modules.append(LoraModule(module, a_key, b_key, base_key, "lora_embedding_A" in parts))
    return modules, next(iter(adapters), "default")


def merge_lora(tensors: dict[str, TensorRef], settings: LoraSettings) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    """Tensors with every LoRA module folded into its base weight, and what was done."""
    modules, adapter = lora_modules(tensors)
    out = dict(tensors)
    scales = set()
    for m in modules:
        module, a_key, b_key, base_key = m.path, m.a_key, m.b_key, m.base_key
        a, b, w = tensors[a_key], tensors[b_key], tensors[base_key]
        scale = settings.scale(module, a.shape[0])
        scales.add(scale)
        transpose = m.embedding or settings.fan_in_fan_out
        for k in (a_key, b_key, base_key):
            del out[k]
        out[f"{module}.weight"] = TensorRef(w.shape, w.dtype, _merged_loader(module, w, a, b, scale, transpose))

    renamed = _peft_renames(out, adapter)
    report = {
        "modules": len(modules),
        "adapter": adapter,
        "scale": sorted(scales),
        "alpha_from": settings.source,
        "use_rslora": settings.use_rslora,
        **renamed,
    }
    return out, report


def _merged_loader(
    module: str, w: TensorRef, a: TensorRef, b: TensorRef, scale: float, transpose: bool
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        delta = (b.load().float() @ a.load().float()) * scale
        delta = delta.T if transpose else delta
        base = w.load()
        if delta.shape != base.shape:
            raise ConversionError(
                f"{module}: LoRA B@A has shape {tuple(delta.shape)}, the base weight {tuple(base.shape)}"
            )
        return (base.float() + delta).to(base.dtype)

    return load


def _peft_renames(out: dict[str, TensorRef], adapter: str) -> dict[str, list[str]]:
    """In place: ``x.base_layer.bias`` → ``x.bias``; ``x.modules_to_save[.adapter].w`` replaces
    ``x.w``; ``x.original_module.w`` dropped."""
    saved_copies = [k for k in out if ".modules_to_save." in k]
    originals = [k for k in out if ".original_module." in k]
    for k in originals:
        del out[k]
    for k in saved_copies:
        target = re.sub(rf"\.modules_to_save\.(?:{re.escape(adapter)}\.)?", ".", k)
        out[target] = out.pop(k)
    for k in [k for k in out if ".base_layer." in k]:
        out[k.replace(".base_layer.", ".")] = out.pop(k)
    return {"modules_to_save": saved_copies, "dropped_original_modules": originals}
