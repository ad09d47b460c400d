"""Key normalisation: checkpoint names → the base model's names, or a clear error.

Wrapper segments are removed anywhere; leading prefixes are removed only when that increases
the number of keys the base model knows; extras (value heads, stale buffers) are dropped and
reported; a tied ``lm_head`` is checked against the embeddings; then the match must be exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from conversion.base import BaseModel
from conversion.errors import ConversionError
from conversion.tensors import TensorRef

WRAPPERS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
PREFIXES = ("module.", "actor.", "policy.", "pretrained_model.", "base_model.model.", "model.")
MAX_PREFIXES = 3  # longest prefix sequence tried, e.g. module.policy.model.
VALUE_HEADS = ("v_head.", "score.", "value_head.", "value_model.")
DROPPABLE: dict[str, Callable[[str], bool]] = {  # dropped (and reported) unless the base has them
    "value head": lambda k: k.startswith(VALUE_HEADS),
    "rotary buffer": lambda k: k.endswith("rotary_emb.inv_freq"),
}
SHOWN = 5  # keys listed per problem in error messages

Tensors = dict[str, TensorRef]


def normalise(tensors: Tensors, base: BaseModel) -> tuple[Tensors, dict[str, Any]]:
    """Rename, drop and check ``tensors`` against ``base``; returns them and a report."""
    tensors, wrappers = remove_wrappers(tensors)
    tensors, prefixes = strip_prefixes(tensors, set(base.reference))
    tensors, dropped = drop_extras(tensors, set(base.reference))
    tensors, tied = resolve_tied(tensors, base)
    check_match(tensors, base)
    report = {"removed_wrappers": wrappers, "stripped_prefixes": prefixes, "dropped": dropped, "lm_head": tied}
    return tensors, report


def _renamed(tensors: Tensors, rename: Callable[[str], str]) -> Tensors | None:
    """``tensors`` under new names, or None if two names collide."""
    out = {rename(k): v for k, v in tensors.items()}
    return out if len(out) == len(tensors) else None


def remove_wrappers(tensors: Tensors) -> tuple[Tensors, list[str]]:
    found = [w for w in WRAPPERS if any(w in k for k in tensors)]

    def unwrap(k: str) -> str:
        for w in found:
            k = k.replace(w, "")
        return k

    out = _renamed(tensors, unwrap)
    if out is None:
        raise ConversionError(f"removing wrapper segments {found} makes two tensors share a name")
    return out, found


def strip_prefixes(tensors: Tensors, reference: set[str]) -> tuple[Tensors, list[str]]:
    """The shortest sequence of leading-prefix removals (each applied to every key that has it)
    that most increases the keys found in ``reference``; none if nothing increases it."""
    best: tuple[int, list[str], Tensors] = (len(tensors.keys() & reference), [], tensors)
    frontier: list[tuple[list[str], Tensors]] = [([], tensors)]
    for _ in range(MAX_PREFIXES):
        grown = []
        for applied, current in frontier:
            for prefix in PREFIXES:
                cand = _renamed(current, _without(prefix)) if any(k.startswith(prefix) for k in current) else None
                if cand is None:
                    continue
                grown.append(([*applied, prefix], cand))
                if len(cand.keys() & reference) > best[0]:
                    best = (len(cand.keys() & reference), [*applied, prefix], cand)
        frontier = grown
    return best[2], best[1]


def _without(prefix: str) -> Callable[[str], str]:
    return lambda k: k.removeprefix(prefix)


def drop_extras(tensors: Tensors, reference: set[str]) -> tuple[Tensors, dict[str, list[str]]]:
    dropped: dict[str, list[str]] = {}
    for kind, matches in DROPPABLE.items():
        keys = sorted(k for k in tensors if k not in reference and matches(k))
        if keys:
            dropped[kind] = keys
    gone = {k for keys in dropped.values() for k in keys}
    return {k: v for k, v in tensors.items() if k not in gone}, dropped


def resolve_tied(tensors: Tensors, base: BaseModel) -> tuple[Tensors, str]:
    """Under tied embeddings an ``lm_head`` equal to the embeddings is dropped, a different one refused."""
    out_key, in_key = base.output_key, base.input_key
    if not base.tied or out_key is None:
        return tensors, "untied"
    if out_key not in tensors:
        return tensors, "tied (absent)"
    if in_key not in tensors:
        raise ConversionError(f"tied embeddings: the checkpoint has {out_key} but no {in_key}")
    head, emb = tensors[out_key].load(), tensors[in_key].load()
    same = head.shape == emb.shape and torch.equal(head.to(emb.dtype), emb)
    if not same:
        raise ConversionError(
            f"{base.path} ties the output to the input embeddings (tie_word_embeddings), but the "
            f"checkpoint's {out_key} differs from its {in_key}: exporting would silently drop the "
            "trained lm_head. Use a base config with tie_word_embeddings false.",
            "untied_lm_head",
        )
    return {k: v for k, v in tensors.items() if k != out_key}, f"tied (dropped {out_key}, equal to {in_key})"


def check_match(tensors: Tensors, base: BaseModel) -> None:
    missing = [k for k in base.reference if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in base.reference)
    if missing or unexpected:
        parts = [
            f"{len(missing)} missing, e.g. {', '.join(missing[:SHOWN])}" if missing else "",
            f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:SHOWN])}" if unexpected else "",
        ]
        raise ConversionError(
            f"the checkpoint's tensors do not match the base model {base.path} after normalisation: "
            + "; ".join(p for p in parts if p),
            "key_mismatch",
        )
    wrong = [(k, tensors[k].shape, shape) for k, shape in base.reference.items() if tensors[k].shape != shape]
    if wrong:
        hint = (
            " (shape-(0,) tensors are ZeRO-3 placeholders: consolidate with zero_to_fp32.py first)"
            if any(s == (0,) for _, s, _ in wrong)
            else ""
        )
        shown = "; ".join(f"{k}: checkpoint {list(s)} vs base {list(b)}" for k, s, b in wrong[:SHOWN])
        raise ConversionError(
            f"{len(wrong)} tensor(s) have the wrong shape for {base.path}: {shown}{hint}", "shape_mismatch"
        )
