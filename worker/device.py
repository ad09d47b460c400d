"""Device and dtype choice: CUDA > MPS > CPU, with a dtype that fits the device."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# CPU flags (Linux /proc/cpuinfo) of hardware bf16 arithmetic: AVX-512 BF16 (Zen 4+, Cooper Lake+) and
# AMX-BF16 (Sapphire Rapids+). Without them torch emulates bf16 matmuls, slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def pick_device(wanted: str = "auto") -> torch.device:
    """The requested device, or the best available one for "auto"."""
    if wanted != "auto":
        return torch.device(wanted)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor listed in a /proc/cpuinfo text (x86 `flags` line)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()


@functools.cache
def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX-BF16); False where unknown."""
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        return False
    return bool(cpu_flags(text) & NATIVE_BF16_FLAGS)


def pick_dtype(wanted: str, device: torch.device) -> torch.dtype:
    """The requested dtype, or for "auto": bf16 on CUDA when supported (else fp16), fp16 on MPS, and on a CPU
    bf16 where it has native bf16 arithmetic (about twice fp32's tokens/s: half the bytes per weight), else fp32."""
    if wanted != "auto":
        return DTYPES[wanted]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
