"""What a loader hands over: the checkpoint's tensors by (raw) name, plus where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conversion.tensors import FileCache, TensorRef


@dataclass
class Checkpoint:
    """Tensors of one checkpoint, named as saved; data stays on disk until a ref is loaded."""

    format: str
    path: Path
    tensors: dict[str, TensorRef]
    caches: list[FileCache] = field(default_factory=list)
    hf_dir: Path | None = None  # config + tokenizer shipped with the checkpoint (verl's huggingface/)
    adapter_config: Path | None = None  # adapter_config.json that goes with LoRA tensors
    details: dict[str, Any] = field(default_factory=dict)

    def release(self) -> None:
        """Unmap every file this checkpoint holds open."""
        for cache in self.caches:
            cache.release()
