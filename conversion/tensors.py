"""Lazy tensors: what a checkpoint holds (name, shape, dtype) without reading its data.

Files are memory-mapped; every page read stays resident while its file is open, so
``FileCache.release()`` unmaps them between batches to keep peak memory near one batch.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conversion.errors import ConversionError

RELEASE_BYTES = 256 * 2**20  # unmap checkpoint files after reading this much
TORCH_SUFFIXES = (".pt", ".bin", ".pth")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
SIZE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class TensorRef:
    """A tensor known by shape and dtype; ``load()`` reads (or computes) it on demand."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize

    def cast_nbytes(self, dtype: torch.dtype) -> int:
        return _numel(self.shape) * dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def ref_of(tensor: torch.Tensor, load: Callable[[], torch.Tensor]) -> TensorRef:
    return TensorRef(tuple(tensor.shape), tensor.dtype, load)


class FileCache:
    """Opens files on demand (``opener(path)``) and keeps them until ``release()``."""

    def __init__(self, opener: Callable[[Path], Any]) -> None:
        self._opener = opener
        self._open: dict[Path, Any] = {}

    def get(self, path: Path) -> Any:
        if path not in self._open:
            self._open[path] = self._opener(path)
        return self._open[path]

    def release(self) -> None:
        self._open.clear()


class ReleaseEvery:
    """Calls ``release()`` on the caches after every ``nbytes`` read through ``spend``."""

    def __init__(self, caches: Iterable[FileCache], nbytes: int = RELEASE_BYTES) -> None:
        self.caches, self.nbytes, self._spent = list(caches), nbytes, 0

    def spend(self, n: int) -> None:
        self._spent += n
        if self._spent >= self.nbytes:
            self.release()

    def release(self) -> None:
        self._spent = 0
        for cache in self.caches:
            cache.release()


def torch_load(path: Path) -> Any:
    """``torch.load`` restricted to weights: a pickle that would run code is refused, unrun."""
    import torch.distributed.tensor  # noqa: F401  (lets the weights-only unpickler build DTensors)

    try:
        try:
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # legacy (non-zip) torch.save files cannot be memory-mapped: read them whole
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            first = str(e).split("WeightsUnpickler error:")[-1].strip().split(". Please use")[0]
            raise ConversionError(
                f"{path}: unsafe pickle refused: torch's weights-only loader rejected it ({first}); "
                "loading it normally could run arbitrary code. Only tensors in plain containers are "
                "accepted: re-save with torch.save(model.state_dict()) or as safetensors.",
                "unsafe_pickle",
            ) from None
        raise ConversionError(f"{path}: not a readable torch checkpoint ({e})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConversionError(f"{path}: not a readable torch checkpoint ({e})") from None


def safe_open_file(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def safetensors_refs(path: Path, cache: FileCache) -> dict[str, TensorRef]:
    """Refs for every tensor in a safetensors file (header only; data read on load)."""
    handle = cache.get(path)
    refs = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise ConversionError(f"{path}: tensor {key} has unsupported dtype {sl.get_dtype()}")
        refs[key] = TensorRef(tuple(sl.get_shape()), dtype, _safetensors_loader(cache, path, key))
    return refs


def _safetensors_loader(cache: FileCache, path: Path, key: str) -> Callable[[], torch.Tensor]:
    return lambda: cache.get(path).get_tensor(key)


def torch_refs(
    state: Mapping[str, Any], cache: FileCache, path: Path, pick: Callable[[Any], Mapping[str, Any]]
) -> dict[str, TensorRef]:
    """Refs for the plain tensors of ``pick(torch_load(path))``; ``state`` is that mapping now."""
    return {
        key: ref_of(value, _torch_loader(cache, path, pick, key))
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def _torch_loader(
    cache: FileCache, path: Path, pick: Callable[[Any], Mapping[str, Any]], key: str
) -> Callable[[], torch.Tensor]:
    return lambda: pick(cache.get(path))[key]


def parse_size(size: str | int) -> int:
    """``"2GB"`` → 2·10⁹, ``"500MiB"`` → 500·2²⁰, ints as bytes."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if not m or m.group(2).upper() not in SIZE_UNITS:
            raise ConversionError(f"max_shard_size {size!r}: expected bytes or e.g. '2GB', '500MiB'")
        n = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise ConversionError(f"max_shard_size must be positive, got {size!r}")
    return n


def parse_dtype(name: str) -> torch.dtype | None:
    """None for ``auto``."""
    if name.lower() not in DTYPE_NAMES:
        raise ConversionError(f"dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name.lower()]
