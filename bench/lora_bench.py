"""LoRA adapters per request, in-process on the real engine: a random Llama shaped like SmolLM2-135M (30 layers,
hidden 576), CPU, greedy, `--threads` torch threads, its weights packed as the service packs them (bf16: the C
tile matmul or oneDNN, q/k/v and gate/up fused). 32 concurrent sequences ("clients") of a short prompt each
decode `--tokens` tokens:

- base: all 32 on the base model (a model with no adapter wrappers: what serving without LoRA costs);
- mixed: the 32 spread round-robin over the base and 4 adapters (rank `--rank` on q/k/v/o/gate/up/down), all in
  the same decode steps (goal: >= 0.7x the base's aggregate tok/s);
- one adapter: all 32 on one adapter (the cost of the delta itself, without the grouping).

Arms run interleaved in one process, medians of `--runs`: tok/s by the wall clock, and by this thread's CPU time
(`time.thread_time`, all of the work with one torch thread), which other processes on a loaded machine disturb far
less. Also the load time of one adapter (read, checked and moved to the model's device), median over the 4.

    uv run python bench/lora_bench.py [--runs 3] [--tokens 32] [--rank 16] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prefix_bench import smollm2_shaped  # noqa: E402
from worker.cpu_weights import pack_linear_weights  # noqa: E402
from worker.engine import Engine, Seq  # noqa: E402
from worker.lora import AdapterSet  # noqa: E402

CLIENTS, ADAPTERS = 32, 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(model: Any, out: Path, rank: int, seed: int) -> Path:
    """A PEFT-format adapter with random A and B on every projection of every layer."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def run(model: Any, adapters: AdapterSet | None, names: list[str | None], tokens: int) -> tuple[float, float]:
    """Aggregate generated tokens per second of `len(names)` sequences added at once: by the wall clock, by this
    thread's CPU time."""
    eng = Engine(model, lambda ids: "", [-1], 0, max_batch=CLIENTS, prefix_cache_tokens=0, adapters=adapters)
    seqs = [Seq(f"s{i}", [1 + i % 7, 2, 3, 4, 5, 6, 7, 8], tokens, adapter=name) for i, name in enumerate(names)]
    started, cpu = time.perf_counter(), time.thread_time()
    for seq in seqs:
        eng.add(seq)
    while len(eng):
        eng.step()
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
    assert all(len(s.out) == tokens for s in seqs)
    done = sum(len(s.out) for s in seqs)
    return done / elapsed, done / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    plain = smollm2_shaped().to(dtype)
    wrapped = copy.deepcopy(plain)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(ADAPTERS)]
        paths = [write_adapter(plain, Path(tmp) / name, args.rank, i) for i, name in enumerate(names)]
        # the weights as the service holds them (worker/handler.py): packed, q/k/v and gate/up fused, where the CPU
        # and dtype allow
        packed = [pack_linear_weights(m, CLIENTS, fuse=True) for m in (plain, wrapped)]
        adapters = AdapterSet(wrapped, ADAPTERS)
        for name, path in zip(names, paths, strict=True):
            adapters.register(name, str(path))
        with torch.inference_mode():
            for name in names:
                adapters.ensure(name, set())
        load = statistics.median(adapters.resident[n].seconds for n in names)
        arms = {
            "base": (plain, None, [None] * CLIENTS),
            "mixed": (wrapped, adapters, [([None, *names])[i % (ADAPTERS + 1)] for i in range(CLIENTS)]),
            "one adapter": (wrapped, adapters, [names[0]] * CLIENTS),
        }
        run(plain, None, [None] * 4, 2)  # warm-up
        rates: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
        for _ in range(args.runs):
            for arm, (model, adapter_set, rows) in arms.items():
                rates[arm].append(run(model, adapter_set, rows, args.tokens))
    base = statistics.median(r[0] for r in rates["base"])
    base_cpu = statistics.median(r[1] for r in rates["base"])
    print(
        f"{CLIENTS} clients, {args.tokens} tokens each, rank {args.rank}, {args.dtype}, {args.threads} thread(s), "
        f"medians of {args.runs}; {packed[0]} linear layers packed"
    )
    for arm, values in rates.items():
        rate, cpu = statistics.median(r[0] for r in values), statistics.median(r[1] for r in values)
        print(
            f"  {arm:12s} {rate:8.1f} tok/s  ({rate / base:.2f}x base);  CPU time {cpu:8.1f} tok/s  ({cpu / base_cpu:.2f}x)"
        )
    print(f"  adapter load {load * 1000:.0f} ms (rank {args.rank}, 7 projections x 30 layers)")


if __name__ == "__main__":
    main()
