"""The host share of a batched decode step: everything but the model forward, at 32 rows, 1 torch thread, bf16,
on a random model shaped like SmolLM2-135M (Llama, hidden 576, 30 layers, 49,152-token vocabulary).

Each scenario admits the rows, then times decode steps: wall time of `Engine.step()` and of the runner's model
forward (the lean forward or transformers', timed around `runner.forward`); host = step - forward (sampling,
stop strings, KV bookkeeping, the loop). The same split in CPU time of the stepping thread (`time.thread_time`;
the forward runs on it with 1 torch thread) comes beside it: on a loaded machine the wall times take others'
turns, the CPU times mostly do not. With `--lean auto off` each scenario runs with the lean forward and with
transformers' forward, one after the other (A/B in one run).

    uv run python bench/step_bench.py [--steps 24] [--rows 1 8 32] [--dtype bf16|fp32] [--kv-chunk N]
        [--lean auto off] [--scenarios greedy T0.8] [--only NAME]
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

SMOL = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49_152)
SCENARIOS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "T0.8": {"temperature": 0.8},
    "T0.8 + stop strings": {"temperature": 0.8, "stop": ["###", "\n\n"]},
    "T0.8 top_k 50 top_p 0.95": {"temperature": 0.8, "top_k": 50, "top_p": 0.95},
    "T0.8 top_p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "T0.8 rep 1.1 + logprobs 2": {"temperature": 0.8, "repetition_penalty": 1.1, "logprobs": True, "top_logprobs": 2},
    "T0.8 min_p pres/freq bias": {
        "temperature": 0.8,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "logit_bias": {str(i): -1.0 for i in range(0, 3000, 10)},
    },
}


def build() -> Path:
    from qwen_deploy.config import default_cache_dir
    from worker.builders.random import Shape, build_random_model

    out = default_cache_dir() / "random-llama-smol135m-shape"
    return build_random_model("llama", Shape(**SMOL), out, log=lambda msg: print(f"  {msg}", file=sys.stderr))


def run(
    handler: Any, scenario: dict[str, Any], rows: int, steps: int, lean: str = "auto", clock: Any = time.perf_counter
) -> tuple[float, ...]:
    """Median step and forward milliseconds over `steps` decode steps of `rows` rows by `clock` (wall time, or e.g.
    `time.thread_time`), then the host's share in CPU time of this thread."""
    import torch

    from worker.engine import runner
    from worker.handler import GenerationRequest

    engine = handler.engine(max_batch=rows, lean_forward=lean)
    for i in range(rows):
        req = GenerationRequest(
            prompt=f"Row {i} says that simple is better than complex, and",
            max_new_tokens=steps + 4,
            ignore_eos=True,
            seed=i,
            **scenario,
        )
        for seq in handler.sequences(req, str(i), budget=600.0)[0]:
            engine.add(seq)
    spent = [0.0, 0.0]
    forward = runner.forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = clock(), time.thread_time()
        try:
            return forward(*args, **kwargs)
        finally:
            spent[0] += clock() - t0
            spent[1] += time.thread_time() - c0

    runner.forward = timed  # type: ignore[assignment]
    try:
        engine.step()  # admission: the prefill
        engine.step()
        step_ms, fwd_ms, step_cpu, fwd_cpu = [], [], [], []
        for _ in range(steps):
            spent[:] = [0.0, 0.0]
            t0, c0 = clock(), time.thread_time()
            engine.step()
            step_ms.append((clock() - t0) * 1000)
            step_cpu.append((time.thread_time() - c0) * 1000)
            fwd_ms.append(spent[0] * 1000)
            fwd_cpu.append(spent[1] * 1000)
        assert engine.rows() == rows, "every row should still be running"
    finally:
        runner.forward = forward  # type: ignore[assignment]
    torch.set_num_threads(1)
    host_cpu = [s - f for s, f in zip(step_cpu, fwd_cpu)]
    return statistics.median(step_ms), statistics.median(fwd_ms), statistics.median(host_cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rows", type=int, nargs="+", default=[32])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--only", default=None, help="scenarios whose name contains this")
    parser.add_argument("--kv-chunk", type=int, default=None, help="grow KV layers by this many positions (0: cat)")
    parser.add_argument("--lean", nargs="+", default=["auto"], choices=["auto", "off"], help="engine.lean_forward")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args()
    import torch

    from qwen_deploy.config import Settings
    from worker.handler import ModelHandler

    torch.set_num_threads(1)
    model_dir = build()
    settings = Settings.model_validate({"model": {"name_or_path": str(model_dir), "threads": 1, "dtype": args.dtype}})
    handler = ModelHandler(settings)
    handler.setup()
    torch.set_num_threads(1)
    if args.kv_chunk is not None:
        from worker.engine import runner

        runner.KV_CHUNK[handler.model.device.type] = args.kv_chunk
    chunk = f", KV chunk {args.kv_chunk}" if args.kv_chunk is not None else ""
    print(f"{handler.info.dtype}, {args.steps} decode steps, 1 thread (medians){chunk}")  # type: ignore[union-attr]
    head = f"{'scenario':28} {'rows':>4} {'lean':>4} {'step ms':>8} {'fwd ms':>8} {'host ms':>8} {'host %':>7}"
    print(f"{head} {'host cpu ms':>11}")
    for name in args.scenarios:
        if args.only and args.only not in name:
            continue
        for rows in args.rows:
            for lean in args.lean:
                step, fwd, host_cpu = run(handler, SCENARIOS[name], rows, args.steps, lean)
                host = step - fwd
                line = f"{name:28} {rows:4} {lean:>4} {step:8.1f} {fwd:8.1f} {host:8.2f} {100 * host / step:6.1f}%"
                print(f"{line} {host_cpu:11.2f}", flush=True)


if __name__ == "__main__":
    main()
