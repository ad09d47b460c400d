"""The decode attention kernel: equal (to bf16 rounding) to `scaled_dot_product_attention` in fp32 on the same bf16
inputs, and no further from it than torch's own bf16 attention, for GQA and plain heads, head_dim 64 and 128,
padded rows (leading and in the middle, a fed padding position), strided views of a larger cache, one position
and lengths that are not a multiple of 16; and random Llama and Qwen2 models in bf16 decode the same greedy tokens
with it on and off through the runner (prefill, decode, a row leaving, rows joining, a cached prefix)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.unit.test_lean_forward import model as random_model
from worker import cpu_attention
from worker.cpu_attention import available, decode_attention, reference, usable
from worker.engine import runner
from worker.engine.lean import LeanForward
from worker.engine.prefix_cache import Prefix, row_kv

pytestmark = pytest.mark.skipif(cpu_attention._fn() is None, reason="no AVX-512 BF16 or no C compiler here")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(
    rows: int, heads: int, kv_heads: int, t: int, d: int, room: int = 24, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [rows, heads, 1, d], and k, v [rows, kv_heads, t, d] as views of a buffer with `room` more positions (the
    KV cache's layout: batch and head strides are not t * d)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, 1, d, generator=gen).to(torch.bfloat16)
    buf = (torch.randn(2, rows, kv_heads, t + room, d, generator=gen) * 2).to(torch.bfloat16)
    return q, buf[0, :, :, :t], buf[1, :, :, :t]


def padded_mask(rows: int, t: int) -> torch.Tensor:
    """Row 0 whole, then left padding of growing length, a hole in the middle of one row (a row that continued a
    cached prefix) and, where there is room, a row whose every position but the fed one is padding."""
    mask = torch.ones(rows, t, dtype=torch.int64)
    for r in range(1, rows):
        mask[r, : (r * 5) % t] = 0
    if rows > 2 and t > 8:
        mask[2, 3:7] = 0
    if rows > 3:
        mask[3, :-1] = 0
    return mask


@pytest.mark.parametrize(
    ("heads", "kv_heads", "t", "d"),
    [
        (9, 3, 40, 64),
        (9, 3, 110, 64),
        (4, 4, 37, 64),
        (8, 2, 1, 128),
        (4, 4, 17, 128),
        (28, 4, 50, 128),
        (6, 1, 16, 64),
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_equals_torch_attention(heads: int, kv_heads: int, t: int, d: int, padded: bool) -> None:
    rows = 5
    q, k, v = inputs(rows, heads, kv_heads, t, d, seed=heads * t + d)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, 1, heads, d] in memory, as RoPE leaves it
    assert not k.is_contiguous()
    mask = None
    if padded:  # the columns of a wider mask, as one is after its leading columns were dropped
        mask = torch.zeros(rows, t + 3, dtype=torch.int64)[:, 3:]
        mask.copy_(padded_mask(rows, t))
    assert usable(q, k, v, mask)
    got = decode_attention(q, k, v, mask, d**-0.5)
    assert got.shape == (rows, 1, heads * d) and got.dtype == torch.bfloat16
    exact = reference(q.float(), k.float(), v.float(), mask, d**-0.5)
    torch_bf16 = reference(q, k, v, mask, d**-0.5).float()
    err, torch_err = (got.float() - exact).abs(), (torch_bf16 - exact).abs()
    # one bf16 rounding of the exact result (half an ulp: 2^-9 relative), plus fp32 summation noise
    assert (err <= exact.abs() * 2**-8 + 1e-5).all(), err.max().item()
    assert err.max() <= torch_err.max() + 1e-6
    torch.testing.assert_close(got.float(), torch_bf16, atol=2e-2, rtol=2e-2)


def test_padding_never_counts_and_the_fed_position_always_does() -> None:
    q, k, v = inputs(2, 4, 2, 20, 64)
    mask = torch.ones(2, 20, dtype=torch.int64)
    mask[0, :12] = 0
    mask[1, :] = 0  # a fed padding position: it attends to itself alone
    got = decode_attention(q, k, v, mask, 0.125)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[0, :, :12] = 1e4
    poisoned_v[0, :, :12] = float("nan")
    poisoned_k[1, :, :-1] = -1e4
    poisoned_v[1, :, :-1] = float("nan")
    assert torch.equal(decode_attention(q, poisoned_k, poisoned_v, mask, 0.125), got)
    own = v[1, :, -1].repeat_interleave(2, 0).reshape(-1)  # each query head of row 1: its kv head's last value
    assert torch.equal(got[1, 0], own)


def test_takes_only_what_it_can_read() -> None:
    q, k, v = inputs(2, 4, 2, 10, 64)
    mask = torch.ones(2, 10, dtype=torch.int64)
    assert usable(q, k, v, mask) and usable(q, k, v, None)
    assert not usable(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, mask)  # d not contiguous
    assert not usable(q, k, v, mask.int())
    assert not usable(q, k, v, mask[:, :9])
    assert not usable(q.float(), k.float(), v.float(), mask)
    assert not usable(q[:, :3], k, v, mask)  # 3 query heads over 2 kv heads
    assert available(64) and available(128) and not available(80)


def model(arch: str) -> Any:
    """A random bf16 model whose head_dim the kernel takes: Llama with GQA (head_dim 64), Qwen2 without (128,
    with q/k/v biases)."""
    heads = {"llama": 4, "qwen2": 2}[arch]
    shape = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=heads)
    return random_model(arch, **shape, num_key_value_heads=2).to(torch.bfloat16)


def greedy(m: Any, lean: LeanForward, seed: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Tokens and logits of greedy decode steps: rows of three lengths, one leaving, two joining (one continuing a
    cached prefix, so its mask has a hole)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 320, (n,), generator=gen).tolist() for n in (7, 3, 12, 16, 5, 2)]
    with torch.inference_mode():
        base, _ = runner.prefill(m, [prompts[3]], 0, lean=lean)
        prefix = Prefix(tuple(prompts[3]), row_kv(base.cache.layers, 0, 0, len(prompts[3])))
        batch, logits = runner.prefill(m, prompts[:3], 0, lean=lean)
        tokens, seen = [], [logits]
        for step in range(8):
            batch.last = seen[-1].argmax(-1)
            tokens.append(batch.last.tolist())
            if step == 2:
                batch.keep([0, 2])
            if step == 4:
                new, joined = runner.prefill(m, prompts[4:], 0, prefix, lean)
                new.last = joined.argmax(-1)
                batch.merge(new)
            seen.append(runner.decode(m, batch, lean))
    return tokens, seen


@pytest.mark.parametrize(("arch", "seed"), [("llama", 16), ("qwen2", 10)])
def test_greedy_tokens_equal_with_the_kernel_on_and_off(arch: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts (`seed`) whose greedy choices are at least 3 bf16 ulps from a tie: a closer one goes either way on
    a single rounding of a logit (bf16 logits near 1 are 2^-7 apart), with or without the kernel."""
    m = model(arch)
    lean = LeanForward(m)
    calls = []
    real = cpu_attention.decode_attention

    def counted(*args: Any) -> torch.Tensor:
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(cpu_attention, "decode_attention", counted)
    on_tokens, on_logits = greedy(m, lean, seed)
    assert len(calls) == 2 * 8  # every decode step, every layer
    monkeypatch.setattr(cpu_attention, "available", lambda head_dim: False)
    off_tokens, off_logits = greedy(m, lean, seed)
    assert len(calls) == 2 * 8
    for logits in off_logits[:-1]:
        top = logits.float().topk(2, -1).values
        assert (top[:, 0] - top[:, 1]).min() >= 3 * 2**-7
    assert on_tokens == off_tokens
    for got, want in zip(on_logits, off_logits):
        torch.testing.assert_close(got.float(), want.float(), atol=0.02, rtol=0.01)
