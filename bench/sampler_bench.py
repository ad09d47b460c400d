"""The sampler alone (`worker.engine.sampler.choose`) on a CPU: its C pass against its tensor path, per sampling
scenario of step_bench, on random bf16 logits of a whole batch (1 torch thread; each scenario's rows with the
penalties' context and counts a decode step would give them). CPU time of this thread, median and minimum, the
two paths interleaved call by call, so a loaded machine weighs on both alike (each also evicts the other's data
from the caches, as a model forward between two steps does).

    uv run python bench/sampler_bench.py [--rows 32] [--vocab 49152] [--calls 60] [--spread 2.0]
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

from bench.step_bench import SCENARIOS  # noqa: E402

KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def plans(scenario: dict[str, Any], rows: int) -> list[Any]:
    from worker.engine.sampler import RowPlan
    from worker.engine.sequence import Sampling

    out = []
    for i in range(rows):
        kw = {k: v for k, v in scenario.items() if k in KEYS}
        bias = {int(k): v for k, v in scenario.get("logit_bias", {}).items()}
        sampling = Sampling(seed=i, logit_bias=bias, **kw)
        sampling.make_generator()
        context = list(range(100 * i, 100 * i + 40)) if sampling.repetition_penalty != 1.0 else []
        counts = {100 * i + j: 1 + j % 3 for j in range(20)}
        lp = scenario.get("top_logprobs", 0) if scenario.get("logprobs") else -1
        out.append(RowPlan(sampling, context, [0], top_logprobs=lp, counts=counts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--spread", type=float, default=2.0, help="standard deviation of the random logits")
    args = parser.parse_args()
    import torch

    from worker.engine import cpu_sampler
    from worker.engine.sampler import choose

    torch.set_num_threads(1)
    x = (torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * args.spread).bfloat16()
    if not cpu_sampler.usable(x, []):
        sys.exit("the C sampler does not run here (no AVX-512 BF16 or no C compiler)")
    print(f"choose() on {args.rows} x {args.vocab} bf16 logits, 1 thread, CPU ms over {args.calls} calls")
    print(f"{'scenario':28} {'C med':>7} {'min':>7} {'tensor med':>10} {'min':>7} {'ratio':>6}")
    for name, scenario in SCENARIOS.items():
        if "stop" in scenario:  # stop strings are the detokenizer's, not the sampler's
            continue
        ps = [plans(scenario, args.rows), plans(scenario, args.rows)]
        spent: list[list[float]] = [[], []]
        for call in range(args.calls + 3):
            for path, native in enumerate((True, False)):
                t0 = time.thread_time()
                choose(x, ps[path], native=native)
                if call >= 3:  # warm-up calls left out
                    spent[path].append((time.thread_time() - t0) * 1000)
        (c, tensor), (c_min, tensor_min) = (statistics.median(s) for s in spent), (min(s) for s in spent)
        print(f"{name:28} {c:7.3f} {c_min:7.3f} {tensor:10.3f} {tensor_min:7.3f} {tensor / c:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
