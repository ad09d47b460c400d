"""Structured output costs: tokenizer wrap, grammar compile, per-step mask (one sequence and batched).

    uv run python bench/structured_bench.py                         # the demo model's tokenizer (384)
    uv run python bench/structured_bench.py --tokenizer DIR         # any HF fast tokenizer directory
    uv run python bench/structured_bench.py --qwen-tiktoken FILE    # build a Qwen-style tokenizer
                                                                     # (~152 k) from a qwen.tiktoken file

Each step is timed over a forced valid answer (the answer's own tokens), so every step masks a
real grammar state. Per-step figures are medians over all steps of all rows.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}
ANSWER = '{"name": "Ada Lovelace", "age": 36, "mood": "happy", "tags": ["math", "poetry"]}'
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_VOCAB = 151936  # Qwen2's padded model vocabulary


def qwen_tokenizer(tiktoken_file: Path, out: Path) -> Path:
    """A byte-level BPE HF tokenizer from Qwen's tiktoken ranks (the Qwen2 vocabulary, 151,643 + specials)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    def load(path: str) -> dict[bytes, int]:
        lines = Path(path).read_bytes().splitlines()
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}

    TikTokenConverter.load_tiktoken_bpe = staticmethod(load)  # type: ignore[method-assign]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    backend = TikTokenConverter(str(tiktoken_file), pattern=QWEN_PATTERN, extra_special_tokens=specials).converted()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    ).save_pretrained(out)
    return out


def median_us(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e6:.0f} µs (p90 {sorted(xs)[int(len(xs) * 0.9)] * 1e6:.0f})"


def run(tokenizer: Any, vocab: int) -> None:
    from worker import structured

    t = time.perf_counter()
    structured.compile_constraint({"type": "json_object"}, tokenizer, vocab)
    print(f"tokenizer wrap + json_object compile: {(time.perf_counter() - t) * 1e3:.0f} ms (once per process)")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    t = time.perf_counter()
    first = structured.compile_constraint(fmt, tokenizer, vocab)
    print(f"schema compile (first use): {(time.perf_counter() - t) * 1e3:.2f} ms")
    t = time.perf_counter()
    structured.compile_constraint(fmt, tokenizer, vocab)
    print(f"schema again (cached) + new constraint: {(time.perf_counter() - t) * 1e6:.0f} µs")
    ids = tokenizer.encode(ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
    fill, apply, accept = [], [], []
    c = first
    assert c is not None
    for tok in ids:
        logits = torch.randn(vocab)
        t0 = time.perf_counter()
        c.fill_bitmask()
        t1 = time.perf_counter()
        structured.apply_bitmask(logits, c.bitmask)
        t2 = time.perf_counter()
        assert logits[tok] > float("-inf"), tokenizer.decode([tok])
        c.accept(tok)
        accept.append(time.perf_counter() - t2)
        fill.append(t1 - t0)
        apply.append(t2 - t1)
    assert c.is_done() and c.error is None
    print(
        f"one sequence, {len(ids)} steps: mask compute {median_us(fill)}, apply {median_us(apply)}, "
        f"accept {median_us(accept)}"
    )
    for batch in (8, 32):
        rows = [first.fork() for _ in range(batch)]
        serial, batched = [], []
        for tok in ids:
            logits = torch.randn(batch, vocab)
            t0 = time.perf_counter()
            for i, row in enumerate(rows):
                row.mask(logits[i])
            t1 = time.perf_counter()
            structured.mask_batch(rows, logits)
            batched.append(time.perf_counter() - t1)
            serial.append(t1 - t0)
            for row in rows:
                row.accept(tok)
        print(f"batch {batch}: per step, mask() row by row {median_us(serial)}, mask_batch {median_us(batched)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="HF tokenizer directory (default: the demo model's)")
    parser.add_argument("--qwen-tiktoken", type=Path, help="build a Qwen-style tokenizer from this file")
    parser.add_argument("--vocab", type=int, help="model vocabulary size (default: Qwen2's or the demo's)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    if args.qwen_tiktoken:
        path = qwen_tokenizer(args.qwen_tiktoken, Path(tempfile.mkdtemp(prefix="qwen-tok-")))
        vocab = args.vocab or QWEN_VOCAB
    elif args.tokenizer:
        path = args.tokenizer
        vocab = args.vocab or len(AutoTokenizer.from_pretrained(path))
    else:
        from worker.demo_model import VOCAB_SIZE, build_demo_model

        path, vocab = build_demo_model(log=lambda msg: None), args.vocab or VOCAB_SIZE
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"$ {' '.join(['python'] + sys.argv)}")
    print(f"tokenizer {path}: {len(tokenizer)} tokens, model vocabulary {vocab}")
    run(tokenizer, vocab)


if __name__ == "__main__":
    main()
