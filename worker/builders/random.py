"""Random-weight causal LMs (Qwen2 or Llama) with a working tokenizer, built locally and cached: for
benchmarks and tests that need a model of a given size or shape but no particular answers.

The tokenizer is the demo model's, or (for a larger vocabulary) a byte-level BPE trained here on the Zen
of Python plus seeded pseudo-words, so the model's every id decodes. No hub access."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from qwen_deploy.config import default_cache_dir
from worker.builders.cache import Log, cached_build

RANDOM_MODEL_VERSION = 1
KIND = "random-model"
Arch = Literal["qwen2", "llama"]


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int | None = None  # None: the demo tokenizer's (384 tokens)
    max_positions: int = 4096


SIZES: dict[str, Shape] = {
    "tiny": Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),  # ~0.1 M: tests
    "38m": Shape(hidden=512, intermediate=2048, layers=10, heads=8, kv_heads=2),  # the job-overhead bench
    "128m": Shape(hidden=768, intermediate=3072, layers=12, heads=12, kv_heads=4, vocab=32_000),  # engine benches
    # SmolLM2-135M's shape (134.5 M parameters; the dtype and llama.cpp benches)
    "135m": Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49_152, max_positions=8192),
}


def random_model_dir(arch: Arch, size: str, cache_dir: Path | None = None) -> Path:
    """Where ``build_random_model(arch, size)`` puts its model by default."""
    return (cache_dir or default_cache_dir()) / f"random-{arch}-{size}-v{RANDOM_MODEL_VERSION}"


def _pseudo_words(n: int, seed: int) -> str:
    """``n`` seeded pronounceable words: enough distinct pairs for a BPE of tens of thousands of tokens."""
    rng = random.Random(seed)
    onsets, vowels, codas = "bcdfghjklmnprstvwz", "aeiouy", ["", "n", "r", "s", "t", "l", "ng", "st"]
    words = [
        "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 4)))
        for _ in range(n)
    ]
    return " ".join(words)


def _tokenizer(shape: Shape, tokenizer_dir: Path | None, seed: int) -> Any:
    """The demo tokenizer (from ``tokenizer_dir`` or the cached demo model), or one of ``shape.vocab`` tokens."""
    from transformers import AutoTokenizer

    if shape.vocab is None:
        if tokenizer_dir is None:
            from worker.builders.demo import build_demo_model

            tokenizer_dir = build_demo_model(log=lambda msg: None)
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    from worker.builders.demo import train_tokenizer, zen_text

    corpus = [zen_text()] * 4 + [_pseudo_words(20_000, seed + i) for i in range(20)]
    return train_tokenizer(corpus, shape.vocab)


def _build(out: Path, arch: Arch, shape: Shape, tokenizer_dir: Path | None, seed: int) -> dict[str, Any]:
    """Save the tokenizer and a randomly initialised model into ``out``; what the marker records."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = _tokenizer(shape, tokenizer_dir, seed)
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[
        arch
    ]
    config = config_class(
        vocab_size=max(len(tok), shape.vocab or 0),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def build_random_model(
    arch: Arch = "qwen2",
    size: str | Shape = "tiny",
    out: Path | None = None,
    *,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    force: bool = False,
    log: Log = lambda msg: None,
) -> Path:
    """A random-weight ``arch`` model of ``size`` (a name in ``SIZES`` or a ``Shape``), built once into
    ``out`` (default under the cache root) and reused while its marker matches the recipe."""
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch must be qwen2 or llama, not {arch!r}")
    shape = SIZES[size] if isinstance(size, str) else size
    if out is None:
        if not isinstance(size, str):
            raise ValueError("a custom Shape needs an explicit out directory")
        out = random_model_dir(arch, size)
    stamp = {
        "version": RANDOM_MODEL_VERSION,
        "arch": arch,
        "shape": asdict(shape),
        "seed": seed,
        "tokenizer": str(tokenizer_dir) if tokenizer_dir and shape.vocab is None else None,
    }
    return cached_build(
        Path(out),
        lambda tmp: _build(tmp, arch, shape, tokenizer_dir, seed),
        kind=KIND,
        stamp=stamp,
        force=force,
        log=log,
        label=f"random {arch} model",
    )


def build_random_qwen2(
    tokenizer_dir: Path,
    out: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """A random Qwen2 of the given shape with the tokenizer of ``tokenizer_dir``, built once into ``out``."""
    shape = Shape(
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        max_positions=max_positions,
    )
    return build_random_model("qwen2", shape, out, tokenizer_dir=tokenizer_dir, seed=seed)
