"""``export_lora_adapter``: a checkpoint whose state dict carries LoRA tensors (verl FSDP, DeepSpeed, a state-dict
file) → a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), left unmerged.

The LoRA modules are renamed onto the base model's module paths; every other tensor of the checkpoint must equal
the base's (otherwise the adapter alone would drop training: export merged instead). Validation loads the written
adapter with PEFT on the base (without PEFT installed: the adapter applied by forward hooks) and compares its
logits with the checkpoint's tensors merged.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from conversion.base import BaseModel, load_base
from conversion.errors import ConversionError
from conversion.export import check_out, prepare, publish, staging
from conversion.formats import open_checkpoint
from conversion.keys import remove_wrappers, strip_prefixes
from conversion.lora import LoraModule, LoraSettings, find_adapter_config, lora_modules, lora_settings
from conversion.tensors import ReleaseEvery, TensorRef
from conversion.validate import compare_logits, probe_logits, source_logits
from conversion.writer import ExportPlan

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_TOLERANCE = 1e-4  # fp32 logits: a merged weight and the unmerged forward sum in another order


def export_lora_adapter(
    checkpoint: Path,
    base: Path,
    out: Path,
    *,
    lora_alpha: float | None = None,
    check: Callable[[Path], None] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Write the LoRA of ``checkpoint`` (layout auto-detected) as a PEFT adapter for ``base`` into ``out``.

    ``out`` appears only once written and validated; ``check(dir)`` (optional) runs on the written adapter
    before it is published and raises to refuse it. Returns the report (also ``out/export_report.json``).
    Raises ``ConversionError``.
    """
    started = time.monotonic()
    checkpoint, base_dir, out = Path(checkpoint).expanduser(), Path(base).expanduser(), Path(out).expanduser()
    say = progress or (lambda stage, fraction: None)
    check_out(out)
    say("load", 0.0)
    base_model = load_base(base_dir)
    if base_model.weights is None:
        raise ConversionError(
            f"keep_lora: the base {base_dir} holds no weights; the adapter is checked on them", "base_without_weights"
        )
    ckpt = open_checkpoint(checkpoint, base_model)
    release = ReleaseEvery([*ckpt.caches, *base_model.caches])
    try:
        tensors, _ = remove_wrappers(ckpt.tensors)
        modules, _ = lora_modules(tensors)
        if not modules:
            raise ConversionError(
                f"{checkpoint} holds no LoRA tensors (lora_A / lora_B): export it without keep_lora", "no_lora"
            )
        settings = lora_settings(ckpt.adapter_config or find_adapter_config(ckpt.path), lora_alpha)
        _refuse_unkeepable(modules, settings)
        targets = base_paths(modules, tensors, base_model)
        merged, notes = prepare(ckpt, base_model, lora_alpha)
        say("write", 0.1)
        kept = {f"{targets[m.path]}.weight": tensors[m.base_key] for m in modules}
        check_rest_is_base({**merged, **kept}, base_model, release)
        with staging(out) as tmp:
            ranks = write_adapter(tmp, modules, targets, tensors, base_model)
            config = adapter_config(ranks, settings, base_dir)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            say("validate", 0.5)
            expected = source_logits(base_dir, ExportPlan(merged, torch.float32), base_model, release)
            release.release()
            got, how = adapted_logits(base_dir, tmp, settings)
            checks = {"logits_match": {**compare_logits(got, expected, torch.float32, LORA_TOLERANCE), "with": how}}
            if check is not None:
                check(tmp)
            report = {
                "ok": True,
                "kind": "lora_adapter",
                "source": {"path": str(checkpoint), "format": ckpt.format, **ckpt.details},
                "base": str(base_dir),
                "out": str(out),
                "modules": len(modules),
                "ranks": sorted(set(ranks.values())),
                "lora_alpha": settings.alpha,
                "alpha_from": settings.source,
                "use_rslora": settings.use_rslora,
                "checks": checks,
                "normalisation": notes["normalisation"],
                "elapsed_s": round(time.monotonic() - started, 3),
            }
            publish(tmp, out, report)
    finally:
        release.release()
    say("validate", 1.0)
    return report


def _refuse_unkeepable(modules: list[LoraModule], settings: LoraSettings) -> None:
    embedded = [m.path for m in modules if m.embedding]
    if embedded:
        raise ConversionError(
            f"embedding LoRA ({embedded[0]}) cannot be kept unmerged: export the checkpoint merged (without keep_lora)",
            "unkeepable_lora",
        )
    if settings.fan_in_fan_out:
        raise ConversionError(
            f"{settings.source}: fan_in_fan_out adapters cannot be kept unmerged: export merged", "unkeepable_lora"
        )


def base_paths(modules: list[LoraModule], tensors: dict[str, TensorRef], base: BaseModel) -> dict[str, str]:
    """Each LoRA module's path in the base model (the prefixes stripped as for the merged export)."""
    probe = {f"{m.path}.weight": tensors[m.base_key] for m in modules}
    renamed, _ = strip_prefixes(probe, set(base.reference))
    found = {m.path: key.removesuffix(".weight") for m, key in zip(modules, renamed)}
    unknown = [m for m, path in found.items() if f"{path}.weight" not in base.reference]
    if unknown:
        raise ConversionError(
            f"LoRA module(s) the base model {base.path} does not have, e.g. {', '.join(unknown[:5])}", "key_mismatch"
        )
    return found


def check_rest_is_base(tensors: dict[str, TensorRef], base: BaseModel, release: ReleaseEvery) -> None:
    """Every tensor but the LoRA deltas equals the base's (compared in the lower precision of the two)."""
    assert base.weights is not None
    for key, ref in tensors.items():
        want_ref = base.weights.get(key)
        if want_ref is None:
            continue
        got, want = ref.load(), want_ref.load()
        low = got.dtype if got.element_size() <= want.element_size() else want.dtype
        if got.shape != want.shape or not torch.equal(got.to(low), want.to(low)):
            raise ConversionError(
                f"the checkpoint's {key} differs from the base's ({base.path}): it holds training besides its "
                "LoRA, which an unmerged adapter would drop. Export it merged (without keep_lora), or check that "
                "the base is the model it was trained from",
                "base_mismatch",
            )
        del got, want
        release.spend(ref.nbytes + want_ref.nbytes)


def write_adapter(
    out: Path, modules: list[LoraModule], targets: dict[str, str], tensors: dict[str, TensorRef], base: BaseModel
) -> dict[str, int]:
    """``adapter_model.safetensors`` in PEFT's saved naming; returns each module's rank by its base path."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    trained = False
    for m in modules:
        path = targets[m.path]
        a, b = tensors[m.a_key].load(), tensors[m.b_key].load()
        fan_out, fan_in = base.reference[f"{path}.weight"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != (fan_out, fan_in):
            raise ConversionError(
                f"{path}: LoRA A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the base weight "
                f"{(fan_out, fan_in)}",
                "shape_mismatch",
            )
        trained = trained or bool(b.any())
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().contiguous().clone()
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().contiguous().clone()
        ranks[path] = int(a.shape[0])
    if not trained:
        raise ConversionError("every lora_B of the checkpoint is zero: the adapter holds no training", "same_as_base")
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return ranks


def adapter_config(ranks: dict[str, int], settings: LoraSettings, base: Path) -> dict[str, Any]:
    """PEFT's ``adapter_config.json``: the most common rank as ``r``, the others in ``rank_pattern``."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "rank_pattern": {path: rank for path, rank in ranks.items() if rank != r},
        "lora_alpha": settings.alpha,
        "alpha_pattern": settings.alpha_pattern,
        "use_rslora": settings.use_rslora,
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path in ranks}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def adapted_logits(base: Path, adapter: Path, settings: LoraSettings) -> tuple[torch.Tensor, str]:
    """Probe logits of ``base`` with the written ``adapter`` unmerged: PEFT's ``PeftModel`` when PEFT is
    installed, else forward hooks adding ``scale * B(A(x))`` to each adapted module."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True).eval()
    try:
        from peft import PeftModel
    except ImportError:
        return hooked_logits(model, adapter, settings), "forward hooks"
    return probe_logits(PeftModel.from_pretrained(model, adapter)), "peft"


def hooked_logits(model: Any, adapter: Path, settings: LoraSettings) -> torch.Tensor:
    """Probe logits of ``model`` with the adapter's deltas added by forward hooks (no PEFT needed)."""
    from safetensors.torch import load_file

    state = load_file(str(adapter / ADAPTER_WEIGHTS))
    handles = []
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        path = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        a, b = state[key].float(), state[f"{PEFT_PREFIX}{path}.lora_B.weight"].float()
        scale = settings.scale(path, a.shape[0])
        handles.append(model.get_submodule(path).register_forward_hook(_delta_hook(a, b, scale)))
    try:
        return probe_logits(model)
    finally:
        for handle in handles:
            handle.remove()


def _delta_hook(a: torch.Tensor, b: torch.Tensor, scale: float) -> Callable[..., torch.Tensor]:
    def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + (args[0] @ a.T @ b.T) * scale

    return hook
