"""Checks of the model: where it is, whether it fits the device's memory, whether the hub token is right."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from qwen_deploy.cli.doctor.context import Context, Outcome, passed, size

MEMORY_MARGIN = 1.25  # weights plus room for activations, KV cache and the runtime


def check_model(ctx: Context) -> Outcome:
    name = ctx.settings.model.name_or_path
    kind, path = ctx.model
    if kind == "local":
        if path and (path / "config.json").is_file():
            return passed(f"local directory {path}")
        return "fail", f"{name}: no such directory, or no config.json in it", "set model.name_or_path"
    if kind == "cache":
        return passed(f"{name} in the local Hugging Face cache ({path})")
    status, _, error = ctx.hub
    if status == 404:
        return "fail", f"{name} not found on the hub (or private)", "check the id; set HF_TOKEN if private"
    return (
        "warn",
        f"{name} not in the local cache; {error or f'hub answered {status}'}",
        f"pre-fetch it: qwen-deploy download {name} (else the worker downloads it at start)",
    )


def _weights(directory: Path) -> tuple[int, int]:
    """(parameters counted from the safetensors headers, bytes of weight files) in a model directory."""
    params, stored = 0, 0
    for file in sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin")):
        stored += file.stat().st_size
        if file.suffix == ".safetensors":
            with file.open("rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
            params += sum(math.prod(meta["shape"]) for key, meta in header.items() if key != "__metadata__")
    return params, stored


def _ram_available() -> int | None:
    """MemAvailable, capped by a cgroup v2 memory limit (containers)."""
    found: list[int] = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        found.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        try:  # no /proc (macOS): what sysconf knows, where it knows it
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _device(preference: str, dtype: str) -> tuple[str, int | None, int, str]:
    """(device, bytes free on it, bytes per loaded parameter, problem), chosen as the worker chooses them."""
    try:
        import torch

        from worker.device import pick_device, pick_dtype
    except ImportError:
        return "cpu", _ram_available(), 4, "torch is not installed"
    device = pick_device(preference)
    usable = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if not usable.get(device.type, True):
        return device.type, None, 4, f"model.device is {preference} but torch cannot use it here"
    free = int(torch.cuda.mem_get_info()[0]) if device.type == "cuda" else _ram_available()
    return device.type, free, pick_dtype(dtype, device).itemsize, ""


def check_memory(ctx: Context) -> Outcome:
    device, free, per_param, problem = _device(ctx.settings.model.device, ctx.settings.model.dtype)
    if problem:
        return ("fail" if free is None else "warn"), problem, "set model.device: auto, or install a torch build for it"
    _, path = ctx.model
    if path is None or not path.is_dir():
        return (
            "warn",
            f"{device}: {size(free or 0)} free; model size unknown (no local files)",
            "pre-fetch the model (qwen-deploy download) to check its size",
        )
    params, stored = _weights(path)
    need = params * per_param if params else stored
    detail = f"{device}: model ~{size(need)} ({params / 1e6:.1f}M parameters), {size(free or 0)} free"
    if free is None:
        return "warn", f"{detail}; free memory unknown", "check free memory by hand"
    if free < need * MEMORY_MARGIN:
        return "warn", f"{detail}: does not fit with a {MEMORY_MARGIN}x margin", "use a GPU, bf16 or a smaller model"
    return passed(detail)


def check_hf_token(ctx: Context) -> Outcome:
    token = "set" if ctx.settings.hf_token else "not set"
    kind, _ = ctx.model
    if kind == "local":
        return passed(f"n/a (local directory); HF_TOKEN {token}")
    status, info, error = ctx.hub
    if status is None:
        if kind == "cache" or token == "set":
            return passed(f"HF_TOKEN {token}; {error}" + ("; the model is in the cache" if kind == "cache" else ""))
        return (
            "warn",
            f"HF_TOKEN not set; cannot tell whether the model is gated ({error})",
            "set HF_TOKEN in .env if the model is gated or private",
        )
    if status in (401, 403):
        return (
            "fail",
            f"HF_TOKEN {token}; the hub refused access ({status})",
            "set a valid HF_TOKEN and accept the model's license on its hub page",
        )
    gated = bool(info.get("gated")) or bool(info.get("private"))
    if gated and token == "not set":
        return "fail", "the model is gated or private and HF_TOKEN is not set", "set HF_TOKEN in .env"
    return passed(f"HF_TOKEN {token}; the model is {'gated' if gated else 'public'}")
