"""The engine's lean forward beside transformers' forward: one decode step's model forward (the runner's
`decode`) at 1 / 8 / 32 rows on a random model of SmolLM2-135M's shape, 1 torch thread, A/B interleaved in one
run. Times are the thread's CPU time (best of 3 medians), so a shared, loaded box still compares the two.

`--stub-linears` replaces every linear layer by a constant output of its shape: what is left is the forward's
own cost around the matmuls (norms, RoPE, attention, KV, Python), the part the lean forward cuts.

    uv run python bench/lean_bench.py [--dtype bf16|fp32] [--rows 1 8 32] [--steps 12] [--stub-linears]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.step_bench import build  # noqa: E402


def stub_linears(model: Any) -> None:
    import torch

    outputs: dict[tuple[Any, ...], torch.Tensor] = {}

    def constant(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        key = (*x.shape[:-1], self.out_features, x.dtype)
        if key not in outputs:
            outputs[key] = torch.randn(*x.shape[:-1], self.out_features, dtype=x.dtype) * 0.01
        return outputs[key]

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(constant, module)  # type: ignore[method-assign]


def step_ms(model: Any, lean: Any, rows: int, steps: int) -> float:
    """Median thread-CPU milliseconds of a decode step's forward, `rows` rows of 12-16 prompt tokens."""
    import torch

    from worker.engine import runner

    prompts = [[5 + (i * 7 + j) % 900 for j in range(12 + i % 5)] for i in range(rows)]
    with torch.inference_mode():
        batch, logits = runner.prefill(model, prompts, 0, lean=lean)
        batch.last = logits.argmax(-1)
        times = []
        for _ in range(steps):
            started = time.thread_time()
            logits = runner.decode(model, batch, lean)
            times.append(time.thread_time() - started)
            batch.last = logits.argmax(-1)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--stub-linears", action="store_true")
    args = parser.parse_args()
    import torch

    from qwen_deploy.config import Settings
    from worker.engine.lean import lean_forward_for
    from worker.handler import ModelHandler

    torch.set_num_threads(1)
    settings = Settings.model_validate({"model": {"name_or_path": str(build()), "threads": 1, "dtype": args.dtype}})
    handler = ModelHandler(settings)
    handler.setup()
    torch.set_num_threads(1)
    model = handler.model
    lean = lean_forward_for(model)
    if args.stub_linears:
        stub_linears(model)
    what = "without the matmuls (linears stubbed)" if args.stub_linears else "whole forward"
    print(f"{handler.info.dtype}, decode step, {what}, thread CPU ms (best of 3 medians of {args.steps} steps)")  # type: ignore[union-attr]
    print(f"{'rows':>4} {'lean':>8} {'transformers':>12} {'ratio':>6}")
    for rows in args.rows:
        lean_ms, hf_ms = [], []
        for _ in range(3):  # interleaved
            lean_ms.append(step_ms(model, lean, rows, args.steps))
            hf_ms.append(step_ms(model, None, rows, args.steps))
        a, b = min(lean_ms), min(hf_ms)
        print(f"{rows:4} {a:8.2f} {b:12.2f} {b / a:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
