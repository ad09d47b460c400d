"""Checks on a written export; each returns a JSON-ready entry or raises ``ConversionError``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch

from conversion.base import BaseModel
from conversion.errors import ConversionError
from conversion.tensors import ReleaseEvery, safe_open_file
from conversion.writer import INDEX_NAME, ExportPlan, Shard

PROBE_TOKENS = 16
LOGITS_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def validate(
    out: Path,
    plan: ExportPlan,
    shards: list[Shard],
    base: BaseModel,
    release: ReleaseEvery,
    tick: Callable[[int], None],
) -> dict[str, Any]:
    checks: dict[str, Any] = {"keys_match": check_keys(out, plan, shards)}
    checks["tensors_equal"], checks["differs_from_base"] = check_tensors(out, plan, shards, base, release, tick)
    release.release()
    expected = source_logits(out, plan, base, release)
    release.release()
    checks["strict_reload"], got = reload_logits(out, plan)
    checks["logits_match"] = compare_logits(got, expected, plan.dtype)
    return checks


def check_keys(out: Path, plan: ExportPlan, shards: list[Shard]) -> dict[str, Any]:
    written: dict[str, str] = {}
    for shard in shards:
        written |= dict.fromkeys(safe_open_file(out / shard.name).keys(), shard.name)
    if len(shards) > 1:
        indexed = json.loads((out / INDEX_NAME).read_text())["weight_map"]
        if indexed != written:
            raise ConversionError(f"{INDEX_NAME} does not match the written shards")
    if set(written) != set(plan.tensors):
        odd = sorted(set(written) ^ set(plan.tensors))[:5]
        raise ConversionError(f"the written key set differs from the planned one, e.g. {odd}")
    return {"ok": True, "tensors": len(written), "shards": len(shards)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def check_tensors(
    out: Path,
    plan: ExportPlan,
    shards: list[Shard],
    base: BaseModel,
    release: ReleaseEvery,
    tick: Callable[[int], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every written tensor bit-equal to the cast source; the first one that differs from the base."""
    differs: str | None = None
    for shard in shards:
        for key in shard.keys:
            got = safe_open_file(out / shard.name).get_tensor(key)
            want = plan.load(key)
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(_bits(got), _bits(want)):
                raise ConversionError(f"{shard.name}: {key} does not read back equal to the checkpoint's tensor")
            if base.weights is not None and differs is None and key in base.weights:
                ref = base.weights[key].load()
                if ref.shape != got.shape or not torch.equal(_bits(ref.to(got.dtype)), _bits(got)):
                    differs = key
            del got, want
            release.spend(2 * plan.nbytes(key))
            tick(plan.nbytes(key))
    if base.weights is None:
        return {"ok": True, "tensors": len(plan.tensors)}, {"status": "skipped", "reason": "the base has no weights"}
    if differs is None:
        raise ConversionError(
            f"every exported tensor equals the base model's ({base.path}): the checkpoint holds no "
            "training (is it the base itself, or an adapter whose lora_B is still zero?)",
            "same_as_base",
        )
    return {"ok": True, "tensors": len(plan.tensors)}, {"ok": True, "first_different": differs}


def _probe(vocab: int) -> torch.Tensor:
    return (torch.arange(PROBE_TOKENS) * 7 + 3).remainder(vocab).unsqueeze(0)


def probe_logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        ids = _probe(model.get_input_embeddings().num_embeddings)
        return model(input_ids=ids).logits.float()


def source_logits(out: Path, plan: ExportPlan, base: BaseModel, release: ReleaseEvery) -> torch.Tensor:
    """Logits of ``from_config`` + ``load_state_dict(strict=True)`` on the source tensors
    (cast copies let the source files be unmapped as they are read; uncast ones keep them mapped)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(out, local_files_only=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
    state: dict[str, torch.Tensor] = {}
    for key in plan.tensors:
        state[key] = plan.load(key)
        release.spend(plan.nbytes(key))
    if base.tied and base.output_key is not None and base.output_key not in state:
        state[base.output_key] = state[base.input_key]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConversionError(f"the source tensors do not load strictly into {type(model).__name__}: {e}") from None
    del state
    return probe_logits(model)


def reload_logits(out: Path, plan: ExportPlan) -> tuple[dict[str, Any], torch.Tensor]:
    """``from_pretrained(out)`` with every loading-info list empty, and its logits."""
    from transformers import AutoModelForCausalLM

    try:
        with _no_progress_bars():
            loaded = AutoModelForCausalLM.from_pretrained(
                out, dtype=plan.dtype, output_loading_info=True, local_files_only=True
            )
            model, info = cast(tuple[Any, dict[str, list[str]]], loaded)  # output_loading_info: (model, info)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConversionError(f"the export does not load with from_pretrained: {e}") from None
    problems = {k: sorted(map(str, v))[:5] for k, v in info.items() if v}
    if problems:
        raise ConversionError(f"from_pretrained({out.name}) reported loading problems: {problems}", "reload_failed")
    return {"ok": True, **{k: [] for k in info}}, probe_logits(model)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar off for the duration (it is global state)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def compare_logits(
    got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tol: float | None = None
) -> dict[str, Any]:
    tol = LOGITS_TOLERANCE.get(dtype, 1e-5) if tol is None else tol
    diff = (got - expected).abs().max().item()
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol):
        raise ConversionError(
            f"the exported model's logits differ from the checkpoint's (max abs diff {diff:.3g}, "
            f"tolerance {tol:g} in {str(dtype).removeprefix('torch.')})",
            "logits_mismatch",
        )
    return {"ok": True, "max_abs_diff": diff, "tolerance": tol, "tokens": PROBE_TOKENS}
