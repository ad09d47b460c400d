"""`model.dtype: auto` per device: bf16 on a CPU with native bf16 arithmetic, fp32 on other CPUs; explicit wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.device import cpu_flags, cpu_has_native_bf16, pick_dtype

ZEN5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx512f amx_tile amx_bf16 amx_int8\n\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\n\n"


@pytest.mark.parametrize(
    ("text", "native"),
    [(ZEN5, True), (SAPPHIRE, True), (SKYLAKE, False), (ARM, False)],
    ids=["avx512_bf16", "amx_bf16", "avx512_only", "arm"],
)
def test_native_bf16_is_read_from_the_cpu_flags(text: str, native: bool, tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(text)
    assert cpu_has_native_bf16(str(tmp_path / "cpuinfo")) is native
    assert ("avx512f" in cpu_flags(text)) is (text is not ARM)


def test_unreadable_cpuinfo_means_fp32(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_auto_follows_the_cpu_and_explicit_dtypes_win(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr("worker.device.cpu_has_native_bf16", lambda native=native: native)
        assert pick_dtype("auto", cpu) is expected
        assert pick_dtype("fp32", cpu) is torch.float32 and pick_dtype("bf16", cpu) is torch.bfloat16
    assert pick_dtype("auto", torch.device("mps")) is torch.float16
