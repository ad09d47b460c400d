"""Decode attention alone, one layer of a SmolLM2-135M-shaped model (9 query heads, 3 kv heads, head_dim 64) in
bf16 on one thread: the lean forward's torch path (the query heads of a kv head as its query positions, one
`scaled_dot_product_attention` under the step's [B, 1, 1, T] mask, then the [B, 1, heads * d] copy the output
projection takes) against the C kernel (worker/cpu_attention.py), on keys and values that are views of a larger
buffer as the KV cache keeps them, a few rows left-padded. CPU time of this thread per call (medians of rounds
that alternate the two), microseconds.

With `--engine`, whole decode steps instead: the engine on a random SmolLM2-135M-shaped Llama (bench/step_bench.py's
model and rows), the kernel on and off in alternating rounds, this thread's CPU milliseconds per `Engine.step()`
and per model forward (medians of each round's medians), so a loaded machine skews them less than wall time.

    uv run python bench/attention_bench.py [--rows 32] [--positions 40 110] [--heads 9] [--kv-heads 3]
        [--head-dim 64] [--calls 200] [--rounds 7]
    uv run python bench/attention_bench.py --engine [--rows 1 8 32] [--steps 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def per_call(fn: Any, calls: int) -> float:
    """This thread's CPU microseconds per call of `fn`."""
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


def measure(rows: int, t: int, padded: bool, heads: int, kv_heads: int, d: int, calls: int, rounds: int) -> list[float]:
    """Median microseconds of the torch path, of it with the step's mask built, and of the kernel."""
    import torch
    import torch.nn.functional as F

    from worker.cpu_attention import decode_attention
    from worker.engine.lean import step_mask

    gen = torch.Generator().manual_seed(rows * 1000 + t)
    q = torch.randn(rows, heads, 1, d, generator=gen).to(torch.bfloat16)
    buf = torch.randn(2, rows, kv_heads, t + 64, d, generator=gen).to(torch.bfloat16)
    k, v = buf[0, :, :, :t], buf[1, :, :, :t]  # views of a buffer with room, as the KV cache keeps them
    mask = torch.ones(rows, t, dtype=torch.int64)
    if padded:
        for r in range(rows):
            mask[r, : (r * 7) % (t // 2)] = 0
    attn_mask = step_mask(mask, 1) if padded else None

    def sdpa(m: Any = attn_mask) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.view(rows, kv_heads, -1, d), k, v, attn_mask=m, scale=d**-0.5)
        return out.view(rows, -1, 1, d).transpose(1, 2).reshape(rows, 1, -1)

    def with_mask() -> torch.Tensor:
        return sdpa(step_mask(mask, 1) if padded else None)

    def kernel() -> torch.Tensor:
        return decode_attention(q, k, v, mask if padded else None, d**-0.5)

    times: list[list[float]] = [[], [], []]
    for _ in range(rounds):
        for i, fn in enumerate((sdpa, with_mask, kernel)):
            times[i].append(per_call(fn, calls))
    return [statistics.median(x) for x in times]


def engine_main(rows_list: list[int], steps: int, rounds: int) -> None:
    """Decode steps with the kernel on and off in alternating rounds (medians of each round's medians)."""
    from unittest import mock

    import torch

    from bench.step_bench import build, run
    from qwen_deploy.config import Settings
    from worker import cpu_attention
    from worker.handler import ModelHandler

    torch.set_num_threads(1)
    settings = Settings.model_validate({"model": {"name_or_path": str(build()), "threads": 1, "dtype": "bf16"}})
    handler = ModelHandler(settings)
    handler.setup()
    torch.set_num_threads(1)
    print(f"bf16, {steps} decode steps x {rounds} rounds per mode, 1 thread: CPU ms of this thread (medians)")
    print(f"{'rows':>4} {'step off':>9} {'step on':>9} {'fwd off':>9} {'fwd on':>9}")
    for rows in rows_list:
        got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(rounds):
            for kernel in (False, True):
                patched = cpu_attention.available if kernel else lambda head_dim: False
                with mock.patch.object(cpu_attention, "available", patched):
                    got[kernel].append(run(handler, {}, rows, steps, clock=time.thread_time)[:2])
        (s0, f0), (s1, f1) = ([statistics.median(x) for x in zip(*got[k])] for k in (False, True))
        print(f"{rows:4} {s0:9.1f} {s1:9.1f} {f0:9.1f} {f1:9.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[32])
    parser.add_argument("--positions", type=int, nargs="+", default=[40, 110])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--engine", action="store_true", help="whole decode steps, the kernel on and off")
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    if args.engine:
        engine_main(args.rows, args.steps, args.rounds)
        return
    import torch

    from worker.cpu_attention import available

    torch.set_num_threads(1)
    if not available(args.head_dim):
        sys.exit("the decode attention kernel does not run here (AVX-512 BF16, a C compiler, 1 thread, head_dim)")
    shape = (args.heads, args.kv_heads, args.head_dim)
    print(" ".join(sys.argv))
    print(
        f"bf16, 1 thread, {shape[0]} heads / {shape[1]} kv heads, head_dim {shape[2]}: us per layer (CPU time, medians)"
    )
    print(f"{'rows':>4} {'T':>4} {'padded':>6} {'sdpa':>8} {'+mask':>8} {'kernel':>8} {'ratio':>6}")
    for rows in args.rows:
        for t in args.positions:
            for padded in (False, True):
                s, m, c = measure(rows, t, padded, *shape, args.calls, args.rounds)
                print(f"{rows:4} {t:4} {padded!s:>6} {s:8.1f} {m:8.1f} {c:8.1f} {s / c:6.1f}", flush=True)


if __name__ == "__main__":
    main()
