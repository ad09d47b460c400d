"""``export_checkpoint``: a training/RL checkpoint → a validated Hugging Face safetensors directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from conversion.base import BaseModel, load_base
from conversion.errors import ConversionError
from conversion.formats import open_checkpoint
from conversion.keys import normalise
from conversion.lora import find_adapter_config, has_lora, lora_settings, merge_lora
from conversion.source import Checkpoint
from conversion.tensors import ReleaseEvery, TensorRef, parse_dtype, parse_size
from conversion.validate import validate
from conversion.writer import ExportPlan, plan_shards, write_shards, write_support_files

REPORT_NAME = "export_report.json"
Progress = Callable[[str, float], None]
STAGES: dict[str, tuple[float, float]] = {  # stage → (start, end) of the overall fraction
    "load": (0.0, 0.05),
    "write": (0.05, 0.55),
    "validate": (0.55, 1.0),
}


def export_checkpoint(
    checkpoint: Path,
    base: Path,
    out: Path,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = "2GB",
    progress: Progress | None = None,
    lora_alpha: float | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` (layout auto-detected) onto ``base``'s architecture into ``out``.

    ``out`` appears only once everything is written and validated; returns the validation
    report (also saved as ``out/export_report.json``). ``lora_alpha`` overrides the adapter
    config's value for checkpoints holding LoRA tensors. Raises ``ConversionError``.
    """
    started = time.monotonic()
    checkpoint, base_dir, out = Path(checkpoint).expanduser(), Path(base).expanduser(), Path(out).expanduser()
    target, max_bytes = parse_dtype(dtype), parse_size(max_shard_size)
    check_out(out)
    say = _stage_reporter(progress)
    say("load", 0.0)
    base_model = load_base(base_dir)
    ckpt = open_checkpoint(checkpoint, base_model)
    release = ReleaseEvery([*ckpt.caches, *base_model.caches])
    try:
        tensors, notes = prepare(ckpt, base_model, lora_alpha)
        plan = ExportPlan(tensors, target or auto_dtype(tensors, base_model))
        release.release()
        with staging(out) as tmp:
            report = _write_and_check(tmp, out, plan, ckpt, base_model, max_bytes, release, say)
            report.update(
                source={"path": str(checkpoint), "format": ckpt.format, **ckpt.details},
                base={
                    "path": str(base_dir),
                    "has_weights": base_model.weights is not None,
                    "weights_not_in_model": base_model.unused_weights[:5],
                },
                out=str(out),
                requested_dtype=dtype,
                **notes,
                elapsed_s=round(time.monotonic() - started, 3),
            )
            publish(tmp, out, report)
    finally:
        release.release()
    say("validate", 1.0)
    return report


def prepare(ckpt: Checkpoint, base: BaseModel, lora_alpha: float | None) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    """LoRA merged, names normalised and checked: the tensors to write, in the base's order."""
    tensors, notes = ckpt.tensors, {}
    if has_lora(tensors.keys()):
        config = ckpt.adapter_config or find_adapter_config(ckpt.path)
        tensors, notes["lora"] = merge_lora(tensors, lora_settings(config, lora_alpha))
    tensors, notes["normalisation"] = normalise(tensors, base)
    return {k: tensors[k] for k in base.reference}, notes


def auto_dtype(tensors: dict[str, TensorRef], base: BaseModel) -> torch.dtype:
    """The checkpoint's floating dtype; if mixed, the config's (float32 if it names none)."""
    found = {r.dtype for r in tensors.values() if r.dtype.is_floating_point}
    if len(found) == 1:
        return found.pop()
    named = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) else torch.float32


def _write_and_check(
    tmp: Path,
    out: Path,
    plan: ExportPlan,
    ckpt: Checkpoint,
    base: BaseModel,
    max_bytes: int,
    release: ReleaseEvery,
    say: Callable[[str, float], None],
) -> dict[str, Any]:
    shards = plan_shards(plan, max_bytes)
    total = sum(s.nbytes for s in shards) or 1
    say("write", 0.0)
    write_shards(tmp, plan, shards, release, _ticker("write", total, say))
    sources = [d for d in (ckpt.hf_dir, base.path) if d is not None]
    copied = write_support_files(tmp, sources, plan.dtype)
    release.release()
    say("validate", 0.0)
    checks = validate(tmp, plan, shards, base, release, _ticker("validate", 2 * total, say))
    return {
        "ok": True,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "tensors": len(plan.tensors),
        "total_bytes": total,
        "shards": [s.name for s in shards],
        "copied_files": copied,
        "checks": checks,
    }


def check_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConversionError(f"output {out} already exists and is not empty; choose another path", "output_exists")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A new partial directory beside ``out`` to write the export into; removed if anything fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on the published directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path, report: dict[str, Any]) -> None:
    """Save the report, then move the finished export into place (an empty ``out`` directory is replaced)."""
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    try:
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except OSError as e:
        raise ConversionError(f"could not move the export into {out}: {e}", "output_exists") from None


def _stage_reporter(progress: Progress | None) -> Callable[[str, float], None]:
    def say(stage: str, fraction: float) -> None:
        if progress is not None:
            start, end = STAGES[stage]
            progress(stage, round(start + (end - start) * min(fraction, 1.0), 4))

    return say


def _ticker(stage: str, total: int, say: Callable[[str, float], None]) -> Callable[[int], None]:
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        say(stage, done / total)

    return tick
