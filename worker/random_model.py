"""Random-weight Qwen2 models that share a tokenizer (the demo model's): for benchmarks and tests
that need a model of a given size or shape but no particular answers."""

from __future__ import annotations

from pathlib import Path


def build_random_qwen2(tokenizer_dir: Path, out: Path, *, hidden: int, intermediate: int, layers: int, heads: int,
                       kv_heads: int, max_positions: int = 4096, seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2ForCausalLM with the tokenizer of `tokenizer_dir` into `out`
    (reused when `out` already holds one)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
