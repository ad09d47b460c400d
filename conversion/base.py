"""The base model: the key names and shapes an export must produce, and its weights if present."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conversion.errors import ConversionError
from conversion.hfdir import hf_refs, hf_weight_files
from conversion.tensors import FileCache, TensorRef


@dataclass
class BaseModel:
    """A local Hugging Face model directory, read without loading its weights."""

    path: Path
    config: Any  # transformers.PretrainedConfig
    reference: dict[str, tuple[int, ...]]  # key to save → shape, in the model's own order
    input_key: str  # e.g. model.embed_tokens.weight
    output_key: str | None  # e.g. lm_head.weight
    tied: bool
    weights: dict[str, TensorRef] | None  # None: the base directory has no weights
    caches: list[FileCache] = field(default_factory=list)
    unused_weights: list[str] = field(default_factory=list)  # base weights the model does not have

    def release(self) -> None:
        for cache in self.caches:
            cache.release()


def load_base(path: Path) -> BaseModel:
    """Read ``path``'s config and weight headers (if any). The key reference is what
    ``from_pretrained`` will expect: ``AutoModelForCausalLM.from_config`` on the meta device,
    without a tied output embedding; the base weights serve the LoRA merge and the
    differs-from-base check."""
    if not (path / "config.json").is_file():
        raise ConversionError(f"base {path}: no config.json (a local Hugging Face model directory is needed)")
    meta, config = _meta_model(path)
    names = {id(m): n for n, m in meta.named_modules()}
    inp, outp = meta.get_input_embeddings(), meta.get_output_embeddings()
    input_key = _prefixed(names[id(inp)], "weight")
    output_key = _prefixed(names[id(outp)], "weight") if outp is not None else None
    tied = outp is not None and outp.weight is inp.weight
    state = meta.state_dict()
    reference = {k: tuple(t.shape) for k, t in state.items() if not (tied and k == output_key)}
    files = hf_weight_files(path)
    weights, caches = hf_refs(files) if files else (None, [])
    unused = sorted(set(weights or {}) - set(state))
    return BaseModel(path, config, reference, input_key, output_key, tied, weights, caches, unused)


def _meta_model(path: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as e:
        raise ConversionError(f"base {path}: not a causal LM that transformers can build ({e})") from None
    return model, config


def _prefixed(module_name: str, leaf: str) -> str:
    return f"{module_name}.{leaf}" if module_name else leaf
