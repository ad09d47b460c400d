"""verl FSDP2 actor checkpoints written by real gloo ranks (3 ranks: vocab 127 shards unevenly)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conversion import ConversionError, export_checkpoint
from tests.unit.conversion.layouts import Tiny, check_export, logits, verl_dir

pytestmark = pytest.mark.slow
WORLD_SIZE = 3


@pytest.fixture(scope="module")
def verl(untied: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return verl_dir(untied, tmp_path_factory.mktemp("verl") / "actor", WORLD_SIZE)


def test_shards_are_uneven_dtensors(verl: Path) -> None:
    from torch.distributed.tensor import DTensor, Shard

    pieces = [
        torch.load(verl / f"model_world_size_3_rank_{r}.pt", weights_only=True)["model.embed_tokens.weight"]
        for r in range(WORLD_SIZE)
    ]
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in pieces)
    assert [p.to_local().shape[0] for p in pieces] == [43, 43, 41]


def test_verl_export(untied: Tiny, verl: Path, tmp_path: Path) -> None:
    report = check_export(verl.parent, untied, tmp_path / "out", logits(untied.trained))  # finds actor/
    assert report["source"]["format"] == "verl-fsdp" and report["source"]["world_size"] == WORLD_SIZE
    assert report["copied_files"]["config.json"] == str(verl / "huggingface")


def test_missing_rank(untied: Tiny, verl: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(verl, tmp_path / "actor", ignore=shutil.ignore_patterns("*_rank_1.pt", "partial"))
    with pytest.raises(ConversionError, match=r"missing FSDP rank file\(s\) model_world_size_3_rank_1.pt"):
        export_checkpoint(broken, untied.base_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_placement(untied: Tiny, verl: Path, tmp_path: Path) -> None:
    partial = shutil.copytree(verl / "partial", tmp_path / "actor")
    with pytest.raises(ConversionError, match=r"model.norm.weight: unsupported DTensor placements \(Partial"):
        export_checkpoint(partial, untied.base_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
