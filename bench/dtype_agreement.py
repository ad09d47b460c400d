"""Greedy agreement of the default CPU dtype (`model.dtype: auto`) with fp32: the first 64 greedy tokens of
32 chat prompts, one prompt at a time (no padding), in each dtype; per model, how many tokens agree up to the
first divergence, how many prompts agree on all 64 and on the answer (up to fp32's first EOS), and the top-1 agreement of the default dtype along fp32's own
greedy path (teacher-forced: one forward over fp32's tokens, every position compared).

No real chat model can be downloaded here, so it runs on the demo model (trained here on the Zen of Python)
and on a random Llama of SmolLM2-135M's shape. A random model's next-token distribution is nearly flat, so a
rounding difference flips its argmax far more often than a trained model's: a worst case, not a chat figure.

    uv run python bench/dtype_agreement.py [--models demo llama-135m] [--prompts 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?",
    "Explain recursion in one sentence.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "What is 17 times 23?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "Summarise the plot of Hamlet.",
    "What does HTTP stand for?",
    "Translate 'good morning' into Spanish.",
    "What is a prime number?",
    "Suggest a name for a cat.",
    "How many legs does a spider have?",
]


def chat_prompts(n: int) -> list[list[dict[str, str]]]:
    """The Zen of Python's line openings (the demo model's training prompts) then general questions."""
    from worker.builders.demo import zen_prompts, zen_text

    texts = [p for p, _ in zen_prompts(zen_text())] + QUESTIONS
    return [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(n)]


def model_dir(name: str) -> Path:
    if name == "demo":
        from worker.builders.demo import build_demo_model

        return build_demo_model(log=lambda msg: print(f"  {msg}", file=sys.stderr))
    from worker.builders.random import build_random_model

    arch, size = name.split("-")
    return build_random_model(arch, size, log=lambda msg: print(f"  {msg}", file=sys.stderr))  # type: ignore[arg-type]


class Greedy:
    """One model in one dtype: greedy continuations one prompt at a time, EOS ignored."""

    def __init__(self, path: Path, dtype: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [self.tok.eos_token_id])
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos[0]

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def run(self, prompt: list[int], tokens: int) -> tuple[list[int], int]:
        """`tokens` greedy ids with EOS suppressed, and the length of the answer with EOS on (up to and including
        the first step whose raw argmax is an EOS id; the two paths are the same until then)."""
        import torch

        x = torch.tensor([prompt])
        with torch.inference_mode():
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
        raw = [int(step[0].argmax()) for step in out.logits]
        answer = next((i + 1 for i, t in enumerate(raw) if t in self.eos), tokens)
        return [int(t) for t in out.sequences[0, len(prompt) :]], answer

    def top1_along(self, prompt: list[int], path: list[int]) -> int:
        """How many of `path`'s tokens this model's argmax picks when fed `path` itself (teacher forcing)."""
        import torch

        x = torch.tensor([prompt + path])
        with torch.inference_mode():
            logits = self.model(x).logits[0, len(prompt) - 1 : -1].float()
            logits[:, self.eos] = float("-inf")  # suppressed, as in the runs
        return int((logits.argmax(-1) == torch.tensor(path)).sum())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(name: str, dtype: Any, n_prompts: int, tokens: int) -> dict[str, Any]:
    import torch

    path = model_dir(name)
    ref, fast = Greedy(path, torch.float32), Greedy(path, dtype)
    prefixes, answers, top1, started = [], 0, 0, time.perf_counter()
    for messages in chat_prompts(n_prompts):
        prompt = ref.encode(messages)
        want, answer = ref.run(prompt, tokens)
        got, got_answer = fast.run(prompt, tokens)
        prefixes.append(common_prefix(want, got))
        answers += got_answer == answer and prefixes[-1] >= answer  # the text the service returns, EOS on
        top1 += fast.top1_along(prompt, want)
    return {
        "model": name,
        "parameters_m": round(sum(p.numel() for p in ref.model.parameters()) / 1e6, 1),
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": n_prompts,
        "tokens": tokens,
        "mean_prefix": round(statistics.mean(prefixes), 1),
        "median_prefix": statistics.median(prefixes),
        "exact": sum(p == tokens for p in prefixes),
        "answers_equal": answers,
        "top1_along_fp32_pct": round(100 * top1 / (n_prompts * tokens), 1),
        "prefixes": prefixes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    import torch

    from worker.device import pick_dtype

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "llama-135m"], help="demo or ARCH-SIZE (random)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = pick_dtype("auto", torch.device("cpu"))
    print(
        f"$ uv run python bench/dtype_agreement.py --models {' '.join(args.models)} --prompts {args.prompts} "
        f"--tokens {args.tokens}"
    )
    if dtype == torch.float32:
        print("model.dtype auto is fp32 on this CPU (no native bf16): comparing bf16 with fp32 instead")
        dtype = torch.bfloat16
    results = [agreement(name, dtype, args.prompts, args.tokens) for name in args.models]
    print(
        f"\n| model | dtype vs fp32 | tokens equal to the first divergence (mean / median of {args.tokens}) "
        f"| prompts equal on all {args.tokens} | answers equal (up to EOS) | top-1 agreement along fp32's path |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} ({r['parameters_m']} M) | {r['dtype']} | {r['mean_prefix']} / {r['median_prefix']} "
            f"| {r['exact']}/{r['prompts']} | {r['answers_equal']}/{r['prompts']} | {r['top1_along_fp32_pct']} % |"
        )
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
