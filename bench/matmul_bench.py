"""The C matmul (worker/cpu_kernels.py) beside oneDNN's packed bf16 matmul, one thread, on the linear layers of a
SmolLM2-135M-shaped model (q/k/v fused 960 x 576, o 576 x 576, gate/up fused 3072 x 576, down 576 x 1536, lm_head
49,152 x 576) at 1 / 8 / 32 rows (decode steps) and 352 rows (a prefill): microseconds per call (median), GFLOP/s,
and for one row the weight bytes streamed per second. A whole model's layers do not fit in any cache, so the `layers`
line runs 30 distinct copies of the four per-layer matrices one after the other, as a decode step does.

    uv run python bench/matmul_bench.py [--rows 1 8 32 352]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from worker import cpu_kernels  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49_152, 576)}
LAYERS = 30


def timed(call: Any, budget: float = 0.4) -> float:
    """Median seconds of `call` over repeats filling about `budget` seconds."""
    call()
    times: list[float] = []
    end = time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 352])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if cpu_kernels.kernel() is None:
        sys.exit("the C kernels do not run here (no AVX-512 BF16 or no C compiler)")
    gen = torch.Generator().manual_seed(0)
    print("bf16, 1 thread; us per call (median); x = oneDNN time / C time")
    print(f"{'layer':8} {'rows':>5} {'C us':>9} {'oneDNN us':>10} {'x':>5} {'C GFLOP/s':>10} {'C GB/s':>7}")
    mats = {name: (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16) for name, (n, k) in SHAPES.items()}
    stack = [[(torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16) for n, k in list(SHAPES.values())[:4]]]
    stack += [[w.clone() for w in stack[0]] for _ in range(LAYERS - 1)]
    for rows in args.rows:
        for name, w in [*mats.items(), ("layers", None)]:
            ws = [w] if w is not None else [m for layer in stack for m in layer]
            ours = [cpu_kernels.pack(m) for m in ws]
            dnn = [torch.ops.mkldnn._reorder_linear_weight(m, 32) for m in ws]
            xs = {m.shape[1]: torch.randn(rows, m.shape[1], generator=gen).to(torch.bfloat16) for m in ws}
            c = timed(lambda xs=xs, ours=ours: [cpu_kernels.matmul(xs[p.shape[1]], p) for p in ours])
            d = timed(
                lambda xs=xs, dnn=dnn: [
                    torch.ops.mkldnn._linear_pointwise(xs[p.shape[1]], p, None, "none", [], "") for p in dnn
                ]
            )
            flops = sum(2 * rows * m.numel() for m in ws)
            nbytes = sum(2 * m.numel() for m in ws)
            print(
                f"{name:8} {rows:5} {c * 1e6:9.1f} {d * 1e6:10.1f} {d / c:5.2f} {flops / c / 1e9:10.0f} "
                f"{nbytes / c / 1e9:7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
