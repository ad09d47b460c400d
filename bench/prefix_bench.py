"""The prefix cache across jobs, in-process on the real engine: a random Llama shaped like SmolLM2-135M
(30 layers, hidden 576, 9 heads / 3 KV heads, 49,152-token vocabulary), 1 torch thread, CPU, fp32, greedy.
Both arms of each figure run in the same process, interleaved, medians of `--runs`:

- bulk: 32 lines sharing a ~600-token instruction (each line: the instruction, then its own ~64-token document;
  8 new tokens each) arriving together, vs the same lines made unique at their start (goal >= 3x faster);
- interactive: time to first token of a 1,500-token prompt that shares its first 1,400 tokens with a finished
  job, vs the same prompt cold (goal <= 0.3x).

    uv run python bench/prefix_bench.py [--runs 3] [--lines 32]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import Engine, Seq  # noqa: E402

VOCAB = 49_152


def smollm2_shaped() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100_000.0,
    )
    return LlamaForCausalLM(config).eval()


def engine(model: Any, cache_tokens: int = 16384) -> Engine:
    return Engine(model, lambda ids: "", [0], 0, prefix_cache_tokens=cache_tokens)


def finish(eng: Engine, seqs: list[Seq]) -> float:
    """Seconds from adding the sequences until every one is done."""
    started = time.perf_counter()
    for seq in seqs:
        eng.add(seq)
    while len(eng):
        eng.step()
    return time.perf_counter() - started


def first_token(eng: Engine, seq: Seq) -> float:
    """Seconds from adding a sequence until it holds its first new token (then it runs to its end)."""
    started = time.perf_counter()
    eng.add(seq)
    while not seq.out:
        eng.step()
    took = time.perf_counter() - started
    while len(eng):
        eng.step()
    return took


def seq(ids: list[int], new: int, key: str = "s") -> Seq:
    return Seq(key, ids, new, ignore_eos=True)


def bulk(model: Any, rng: random.Random, lines: int) -> tuple[float, float]:
    """(shared instruction, unique lines) seconds for one micro-batch each, on fresh engines."""
    instruction = [rng.randrange(1, VOCAB) for _ in range(600)]
    docs = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(48, 80))] for _ in range(lines)]
    shared = finish(engine(model), [seq(instruction + d, 8, str(i)) for i, d in enumerate(docs)])
    unique = finish(engine(model), [seq([1 + i] + instruction + d, 8, str(i)) for i, d in enumerate(docs)])
    return shared, unique


def interactive(model: Any, rng: random.Random) -> tuple[float, float]:
    """(after a finished job sharing 1,400 tokens, cold) seconds to the first token of a 1,500-token prompt."""
    common = [rng.randrange(1, VOCAB) for _ in range(1400)]
    earlier = common + [rng.randrange(1, VOCAB) for _ in range(100)]
    prompt = common + [rng.randrange(1, VOCAB) for _ in range(100)]
    warm = engine(model)
    finish(warm, [seq(earlier, 8)])
    return first_token(warm, seq(prompt, 8)), first_token(engine(model), seq(prompt, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lines", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"$ uv run python bench/prefix_bench.py --runs {args.runs} --lines {args.lines}")
    model = smollm2_shaped()
    rng = random.Random(0)
    with torch.inference_mode():
        interactive(model, rng)  # warm-up: first-call costs out of the figures
        runs = [(bulk(model, rng, args.lines), interactive(model, rng)) for _ in range(args.runs)]
    shared = statistics.median(r[0][0] for r in runs)
    unique = statistics.median(r[0][1] for r in runs)
    warm = statistics.median(r[1][0] for r in runs)
    cold = statistics.median(r[1][1] for r in runs)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nrandom Llama, SmolLM2-135M shape ({params:.1f} M parameters), 1 torch thread, medians of {args.runs}")
    print(
        f"bulk, {args.lines} lines x 8 tokens: shared ~600-token instruction {shared:.2f} s, "
        f"lines unique at the start {unique:.2f} s: {unique / shared:.1f}x faster (goal >= 3x)"
    )
    print(
        f"interactive, 1,500-token prompt: time to first token {warm * 1000:.0f} ms after a finished job sharing "
        f"1,400 tokens, {cold * 1000:.0f} ms cold: {warm / cold:.2f}x (goal <= 0.3x)"
    )
    figures = {"bulk_shared_s": shared, "bulk_unique_s": unique, "ttft_warm_s": warm, "ttft_cold_s": cold}
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
