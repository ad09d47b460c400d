"""keep_lora: checkpoints whose state dict carries PEFT LoRA tensors (verl FSDP2 at world size 1 and 2, DeepSpeed)
written as a PEFT adapter directory, unmerged; PEFT on the base with it gives the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conversion import ConversionError
from conversion.keep_lora import export_lora_adapter, hooked_logits
from conversion.lora import lora_settings
from tests.unit.conversion.layouts import Tiny, deepspeed_dir, logits, peft_model, verl_lora_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(untied: Tiny) -> dict[str, Any]:
    """The PEFT-wrapped model (r 4, alpha 8) and its logits (the unmerged forward: what training saw)."""
    model = peft_model(untied)
    return {"model": model, "logits": logits(model)}


def adapted(tiny: Tiny, adapter: Path) -> torch.Tensor:
    """Logits of the base with the exported adapter loaded by PEFT (unmerged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny.base_dir, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, adapter).eval())


@pytest.mark.parametrize("world_size", [1, 2])
def test_verl_fsdp_lora_kept_as_a_peft_adapter(
    untied: Tiny, trained: dict[str, Any], tmp_path: Path, world_size: int
) -> None:
    actor = verl_lora_dir(untied, trained["model"], tmp_path / "actor", world_size, alpha=0)  # as verl writes it
    with pytest.raises(ConversionError, match="lora_alpha is 0") as refused:
        export_lora_adapter(actor, untied.base_dir, tmp_path / "out")
    assert refused.value.code == "lora_alpha_zero" and not (tmp_path / "out").exists()

    stages: list[str] = []
    report = export_lora_adapter(
        actor, untied.base_dir, tmp_path / "out", lora_alpha=8, progress=lambda s, f: stages.append(s)
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "export_report.json",
    ]
    assert report["source"]["format"] == "verl-fsdp" and report["source"]["world_size"] == world_size
    assert report["modules"] == 2 * 6 and report["ranks"] == [4] and report["alpha_from"] == "the lora_alpha argument"
    assert (
        report["checks"]["logits_match"]["with"] == "peft" and report["checks"]["logits_match"]["max_abs_diff"] < 1e-4
    )
    assert stages[0] == "load" and stages[-1] == "validate"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8.0, {})
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    from safetensors import safe_open

    keys = set(safe_open(str(out / "adapter_model.safetensors"), framework="pt").keys())
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 2 * 6
    got = adapted(untied, out)
    assert (got - trained["logits"]).abs().max().item() < 1e-4
    assert (got - logits(untied.trained)).abs().max().item() > 0.1  # not some other model's logits
    # without PEFT installed the check applies the written adapter by forward hooks: PEFT's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conversion.validate import probe_logits

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(untied.base_dir, dtype=torch.float32).eval()

    plain = base()
    hooked = hooked_logits(plain, out, lora_settings(out / "adapter_config.json", None))
    with_peft = probe_logits(PeftModel.from_pretrained(base(), out))
    assert (hooked - with_peft).abs().max().item() < 1e-5
    assert (probe_logits(plain) - hooked).abs().max().item() > 0.1  # the hooks are removed afterwards


def test_deepspeed_lora_kept_and_config_beside_gives_alpha(
    untied: Tiny, trained: dict[str, Any], tmp_path: Path
) -> None:
    state = {k: v.detach().clone() for k, v in trained["model"].state_dict().items()}
    ds = deepspeed_dir(tmp_path / "ds", state, {})
    trained["model"].peft_config["default"].save_pretrained(ds / "global_step7")  # alpha 8 beside it
    report = export_lora_adapter(ds, untied.base_dir, tmp_path / "out")
    assert report["source"]["format"] == "deepspeed" and report["alpha_from"].endswith("adapter_config.json")
    assert (adapted(untied, tmp_path / "out") - trained["logits"]).abs().max().item() < 1e-4


def test_refusals(untied: Tiny, trained: dict[str, Any], tmp_path: Path) -> None:
    state = {k: v.detach().clone() for k, v in trained["model"].state_dict().items()}
    key = "base_model.model.model.norm.weight"
    cases: list[tuple[dict[str, torch.Tensor], str]] = [
        ({**state, key: state[key] + 0.5}, "base_mismatch"),  # trained besides the LoRA
        ({k: v for k, v in untied.trained.state_dict().items()}, "no_lora"),
        ({k: (v * 0 if "lora_B" in k else v) for k, v in state.items()}, "same_as_base"),
    ]
    for i, (case, code) in enumerate(cases):
        torch.save(case, tmp_path / f"c{i}.pt")
        with pytest.raises(ConversionError) as refused:
            export_lora_adapter(tmp_path / f"c{i}.pt", untied.base_dir, tmp_path / f"out{i}", lora_alpha=8)
        assert refused.value.code == code, refused.value
        assert not (tmp_path / f"out{i}").exists() and not list(tmp_path.glob(f".out{i}.partial-*"))
    checked: list[Path] = []

    def refuse(adapter: Path) -> None:
        checked.append(adapter)
        raise ConversionError("not for this server", "invalid_adapter")

    torch.save(state, tmp_path / "ok.pt")
    with pytest.raises(ConversionError, match="not for this server"):
        export_lora_adapter(tmp_path / "ok.pt", untied.base_dir, tmp_path / "refused", lora_alpha=8, check=refuse)
    assert checked and (checked[0].name.startswith(".refused.partial-")) and not (tmp_path / "refused").exists()
