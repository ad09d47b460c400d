"""Fabricate checkpoint layouts from a tiny Qwen2: base dirs, HF, DeepSpeed, TRL, PEFT, verl FSDP2."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY = {
    "vocab_size": 127,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
PROBE = torch.tensor([[5, 17, 42, 99, 3, 126, 0, 64, 8, 77]])


@dataclass
class Tiny:
    """A base model directory and a "trained" model derived from it."""

    tied: bool
    base_dir: Path
    trained: Any  # Qwen2ForCausalLM

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.trained.state_dict().items()}


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def save_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, TINY["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(d)


def make_tiny(root: Path, tied: bool) -> Tiny:
    """Base saved with save_pretrained (+ tokenizer); trained = base + noise on every tensor."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1 if tied else 2)
    base = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=tied, **TINY)).eval()
    base_dir = root / ("base-tied" if tied else "base-untied")
    base.save_pretrained(base_dir)
    save_tokenizer(base_dir)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Tiny(tied, base_dir, base)


def logits(model: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits on PROBE; with ``dtype``, of a copy built in that dtype (buffers as from_pretrained makes them)."""
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        copy.load_state_dict(model.state_dict())
        model = copy.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def without_weights(tiny: Tiny, d: Path) -> Path:
    """The base's config and tokenizer only."""
    d.mkdir()
    for f in tiny.base_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy2(f, d / f.name)
    return d


# -- layouts -----------------------------------------------------------------------------


def deepspeed_dir(d: Path, module: dict[str, torch.Tensor], shared: dict[str, str], tag: str = "global_step7") -> Path:
    """DeepSpeed ZeRO<=2 layout: ``latest`` + ``<tag>/mp_rank_00_model_states.pt`` (weights under module)."""
    (d / tag).mkdir(parents=True)
    (d / "latest").write_text(tag)
    state = {
        "module": module,
        "buffer_names": [],
        "shared_params": shared,
        "optimizer": None,
        "param_shapes": [{k: v.shape for k, v in module.items()}],
        "ds_version": "0.16.0",
        "global_steps": 7,
        "dp_world_size": 2,
        "mp_world_size": 1,
    }
    torch.save(state, d / tag / "mp_rank_00_model_states.pt")
    return d


class ValueHead(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden, 1)


class WithValueHead(nn.Module):
    """TRL's AutoModelForCausalLMWithValueHead layout: ``pretrained_model.*`` + ``v_head.*``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pretrained_model = model
        self.v_head = ValueHead(TINY["hidden_size"])


def peft_model(tiny: Tiny, **lora: Any) -> Any:
    """The base weights wrapped by PEFT with a random (non-zero B) LoRA on LORA_TARGETS."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny.base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, **lora)
    wrapped = get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".modules_to_save." in name:  # a fully trained copy of the module
                p.add_(torch.randn_like(p) * 0.05)
    return wrapped


# -- verl FSDP2 --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verl_dir(tiny: Tiny, d: Path, world_size: int) -> Path:
    """Real FSDP2 shards from ``world_size`` gloo processes, plus fsdp_config.json and huggingface/.

    Ranks are forked, not spawned: a spawned rank re-imports torch and transformers (about 30 s
    for three ranks on two cores) where a forked one starts in well under a second. Each rank also
    writes a copy with one Partial-placed DTensor to ``d/partial`` for the unsupported-placement test.
    """
    import torch.multiprocessing as mp

    d.mkdir(parents=True)
    (d / "partial").mkdir()
    mp.start_processes(_fsdp_rank, args=(world_size, tiny, d, free_port()), nprocs=world_size, start_method="fork")
    _verl_files(tiny, d, world_size)
    return d


def _verl_files(tiny: Tiny, d: Path, world_size: int) -> None:
    """What verl writes beside the rank files: fsdp_config.json and huggingface/ (config, tokenizer)."""
    (d / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    hf = d / "huggingface"
    hf.mkdir()
    for f in tiny.base_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy2(f, hf / f.name)


def _fsdp_rank(rank: int, world_size: int, tiny: Tiny, d: Path, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial
    from transformers import Qwen2ForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = Qwen2ForCausalLM(tiny.trained.config)
        model.load_state_dict(tiny.trained.state_dict())
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = model.state_dict()
        torch.save(state, d / f"model_world_size_{world_size}_rank_{rank}.pt")
        key = "model.norm.weight"
        state[key] = DTensor.from_local(state[key].to_local(), mesh, [Partial()], run_check=False)
        torch.save(state, d / "partial" / f"model_world_size_{world_size}_rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


def verl_lora_dir(tiny: Tiny, peft: Any, d: Path, world_size: int, alpha: float | None) -> Path:
    """A verl FSDP2 actor dir of a PEFT-wrapped model (``...base_layer.weight``, ``...lora_A.default.weight``
    keys), from ``world_size`` forked gloo ranks; ``alpha``: the ``lora_alpha`` of the adapter_config.json
    written beside it (verl writes 0), None: none written."""
    import torch.multiprocessing as mp

    d.mkdir(parents=True)
    mp.start_processes(_fsdp_peft_rank, args=(world_size, peft, d, free_port()), nprocs=world_size, start_method="fork")
    _verl_files(tiny, d, world_size)
    if alpha is not None:
        (d / "lora_adapter").mkdir()
        peft.peft_config["default"].save_pretrained(d / "lora_adapter")
        config = json.loads((d / "lora_adapter" / "adapter_config.json").read_text())
        (d / "lora_adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    return d


def _fsdp_peft_rank(rank: int, world_size: int, peft: Any, d: Path, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in peft.base_model.model.model.layers:  # the forked copy of the parent's model
            fully_shard(layer, mesh=mesh)
        fully_shard(peft, mesh=mesh)
        torch.save(peft.state_dict(), d / f"model_world_size_{world_size}_rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- checks --------------------------------------------------------------------------------


def check_export(
    checkpoint: Path, tiny: Tiny, out: Path, expected: torch.Tensor, atol: float = 0.0, **kwargs: Any
) -> dict[str, Any]:
    """Export, then: report saved and passing, files in place, reloaded logits == ``expected``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion import export_checkpoint

    report = export_checkpoint(checkpoint, tiny.base_dir, out, **kwargs)
    assert report["ok"] and json.loads((out / "export_report.json").read_text()) == json.loads(json.dumps(report))
    assert all(c.get("ok", c.get("status") == "skipped") for c in report["checks"].values())
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w5") == 5
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    got = logits(model)
    assert (got - expected).abs().max().item() <= atol, (got - expected).abs().max().item()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    (out.parent / "fresh").mkdir()
    assert out.stat().st_mode == (out.parent / "fresh").stat().st_mode  # umask honoured, not mkdtemp's 0700
    (out.parent / "fresh").rmdir()
    return report
