"""A LoRA exported unmerged (`qwen-deploy export --keep-lora`). A PEFT adapter directory is checked against its
base, copied into place, and its logits checked: the base with the adapter served per row (worker/lora.py)
against the base with the adapter merged by hand (W + scale * B @ A), on the same prompt. A training checkpoint
whose state dict carries LoRA tensors (verl FSDP, DeepSpeed) is written as a PEFT adapter by the conversion
package (conversion/keep_lora.py), which checks it with PEFT; here it must also be servable on its base."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwen_deploy.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, base_config_of, check_base, read_adapter
from worker.lora import AdapterSet

REPORT_NAME = "export_report.json"
TOLERANCE = 1e-3  # fp32 logits: per-row deltas and a merged weight sum in another order


def export_kept_lora(
    checkpoint: Path,
    base: Path,
    out: Path,
    lora_alpha: float | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """keep_lora: a PEFT adapter directory checked and copied, or a checkpoint's LoRA tensors written as one.
    Raises AdapterError (it cannot be served on `base`) or ConversionError (it cannot be exported)."""
    from conversion.formats import detect_peft

    if detect_peft(checkpoint) is not None:
        return export_adapter(checkpoint, base, out)
    from conversion.keep_lora import export_lora_adapter

    def servable(adapter_dir: Path) -> None:
        config = base_config_of(str(base))
        if config is None:
            raise AdapterError(f"{base} has no readable config.json")
        check_base(read_adapter(adapter_dir), config, [str(base)])

    return export_lora_adapter(checkpoint, base, out, lora_alpha=lora_alpha, check=servable, progress=progress)


def export_adapter(checkpoint: Path, base: Path, out: Path) -> dict[str, Any]:
    """Check the adapter directory `checkpoint` against `base`, write it to `out` (a new directory, published
    once checked) and return the report (also `out/export_report.json`). Raises AdapterError saying why."""
    started = time.monotonic()
    if out.exists():
        raise AdapterError(f"{out} exists; give a new directory")
    adapter = read_adapter(checkpoint)
    config = base_config_of(str(base))
    if config is None:
        raise AdapterError(f"{base} has no readable config.json")
    check_base(adapter, config, [str(base), str(config.get("_name_or_path") or "")])
    max_diff = _logits_diff(checkpoint, base)
    if max_diff > TOLERANCE:
        raise AdapterError(f"the served adapter's logits differ from the merged model's by {max_diff:.2e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(checkpoint / name, tmp / name)
        report = {
            "kind": "lora_adapter",
            "source": str(checkpoint),
            "base": str(base),
            "out": str(out),
            "modules": len(adapter.modules),
            "ranks": sorted({m.rank for m in adapter.modules}),
            "logits_max_abs_diff": max_diff,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _logits_diff(checkpoint: Path, base: Path) -> float:
    """Max |logits| difference, fp32 on the CPU, between the adapter served per row and merged by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    adapters = AdapterSet(model, 1, [str(base)])
    adapters.register("check", str(checkpoint))
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.arange(1, 17).remainder(vocab)[None]
    with torch.inference_mode():
        adapters.ensure("check", set())
        adapters.bind(["check"])
        served = model(input_ids=ids).logits
        adapters.bind([None])
        for wrapper in adapters.wrapped.values():  # merge into the base weights, then run without deltas
            weight: Any = wrapper.base.weight
            for a, bt in wrapper.deltas.values():
                weight += bt.T @ a
        merged = model(input_ids=ids).logits
    return float((served - merged).abs().max())
