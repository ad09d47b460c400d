"""Device and dtype choice: CUDA > MPS > CPU, with a dtype that fits the device."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def pick_dtype(wanted: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA when supported (else fp16), fp16 on MPS, fp32 on CPU, unless asked otherwise."""
    if wanted != "auto":
        return DTYPES[wanted]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32
