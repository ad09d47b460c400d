"""Small pieces: sizes, dtypes, prefix stripping."""

from __future__ import annotations

import pytest
import torch

from conversion import ConversionError
from conversion.keys import strip_prefixes
from conversion.tensors import TensorRef, parse_dtype, parse_size


@pytest.mark.parametrize(
    ("size", "expected"), [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1.5 kb", 1500), (4096, 4096)]
)
def test_parse_size(size: str | int, expected: int) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["2 parsecs", "", 0, "-1GB"])
def test_parse_size_rejects(size: str | int) -> None:
    with pytest.raises(ConversionError, match="max_shard_size"):
        parse_size(size)


def test_parse_dtype() -> None:
    assert parse_dtype("auto") is None and parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype("fp32") is torch.float32
    with pytest.raises(ConversionError, match="expected one of auto"):
        parse_dtype("int4")


def _refs(*keys: str) -> dict[str, TensorRef]:
    return {k: TensorRef((1,), torch.float32, lambda: torch.zeros(1)) for k in keys}


REFERENCE = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_model_prefix_kept_when_stripping_would_lose_matches() -> None:
    refs, applied = strip_prefixes(_refs(*REFERENCE), REFERENCE)
    assert applied == [] and set(refs) == REFERENCE


def test_one_extra_model_prefix_removed() -> None:
    refs, applied = strip_prefixes(_refs(*(f"model.{k}" for k in REFERENCE)), REFERENCE)
    assert applied == ["model."] and set(refs) == REFERENCE


def test_stacked_prefixes() -> None:
    refs, applied = strip_prefixes(_refs(*(f"module.policy.{k}" for k in REFERENCE)), REFERENCE)
    assert applied == ["module.", "policy."] and set(refs) == REFERENCE
