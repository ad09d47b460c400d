"""Export benchmark: wall time and peak RSS of ``export_checkpoint`` on a ~0.75 GB random checkpoint.

A first subprocess writes a random-weight Qwen2 checkpoint (bf16) to a temp dir, as a sharded HF
safetensors directory (``--layout hf``) or one torch file nested under ``module`` (``--layout
pt``), plus a base directory (config + random weights); a second one runs ``export_checkpoint``.
Printed: wall time, and peak RSS as a multiple of the checkpoint size, from
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the max over both children: valid when the export's
peak is the larger, which the output says) and from the export child's own ``VmHWM``, with and
without the memory its imports alone take. This parent never imports torch, so its own memory
cannot leak into the children's figures through fork/exec.

    uv run python bench/export_bench.py [--layout hf|pt] [--layers 27] [--dtype auto] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}
SHARD_BYTES = 200 * 10**6  # of the generated checkpoint and base

EXPORT = """
import json, sys, time
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
import torch, transformers, safetensors
from transformers import AutoModelForCausalLM  # what the export imports anyway
from conversion import export_checkpoint
baseline = status("VmRSS")
t = time.monotonic()
report = export_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], dtype=sys.argv[4])
print(json.dumps({"baseline_mb": baseline, "hwm_mb": status("VmHWM"), "export_s": time.monotonic() - t,
                  "shards": len(report["shards"]), "dtype": report["dtype"]}))
"""


def build(root: Path, layers: int, layout: str) -> None:
    """Child 1: write ``root/base`` and ``root/ckpt`` (or ``root/actor.pt``); print sizes as JSON."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(num_hidden_layers=layers, dtype="bfloat16", **SHAPE)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir()
    config.save_pretrained(base)  # no tokenizer: the export copies one only if the base has it
    _write_sharded(base, shapes, gen)
    if layout == "hf":
        ckpt = root / "ckpt"
        ckpt.mkdir()
        config.save_pretrained(ckpt)
        _write_sharded(ckpt, shapes, gen)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    else:
        ckpt = root / "actor.pt"
        torch.save({"module": {k: _random(s, gen) for k, s in shapes.items()}, "global_steps": 1}, ckpt)
        size = ckpt.stat().st_size
    print(json.dumps({"checkpoint": str(ckpt), "base": str(base), "bytes": size, "hwm_mb": _hwm_mb()}))


def _hwm_mb() -> float:
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    import torch

    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def _write_sharded(d: Path, shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    groups: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for k, s in shapes.items():
        n = 2
        for dim in s:
            n *= dim
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][k] = s
        size += n
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: _random(s, gen) for k, s in group.items()}, d / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, name)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _run(cmd: list[str]) -> dict[str, Any]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{cmd[:3]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=["hf", "pt"], default="hf")
    parser.add_argument("--layers", type=int, default=27, help="27 layers ≈ 0.74 GB in bf16")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # child 1
    args = parser.parse_args()
    if args.build:
        return build(args.build, args.layers, args.layout)
    root = Path(tempfile.mkdtemp(prefix="export-bench-"))
    try:
        built = _run(
            [sys.executable, __file__, "--build", str(root), "--layers", str(args.layers), "--layout", args.layout]
        )
        after_build = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        t = time.monotonic()
        child = _run(
            [sys.executable, "-c", EXPORT, str(built["checkpoint"]), str(built["base"]), str(root / "out"), args.dtype]
        )
        wall = time.monotonic() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size_mb = built["bytes"] / 2**20
        base_mb, hwm = child["baseline_mb"], child["hwm_mb"]
        print(f"command: {shlex.join(['uv', 'run', 'python', 'bench/export_bench.py', *sys.argv[1:]])}")
        print(
            f"checkpoint: {args.layout}, {size_mb:.0f} MiB ({args.layers} layers, bf16) -> {child['dtype']}, "
            f"{child['shards']} output shard(s)"
        )
        print(f"wall: {wall:.1f} s for the export subprocess (export_checkpoint itself {child['export_s']:.1f} s)")
        valid = "valid" if peak > after_build else f"not valid: the builder's {after_build:.0f} MiB is larger"
        print(f"peak RSS, ru_maxrss(RUSAGE_CHILDREN): {peak:.0f} MiB = {peak / size_mb:.2f}x checkpoint ({valid})")
        print(
            f"peak RSS, export child's VmHWM: {hwm:.0f} MiB = {hwm / size_mb:.2f}x checkpoint; above the "
            f"{base_mb:.0f} MiB its imports take: {hwm - base_mb:.0f} MiB = {(hwm - base_mb) / size_mb:.2f}x"
        )
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
