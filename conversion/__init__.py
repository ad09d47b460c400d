"""Download and export of models; export turns training/RL checkpoints (HF, verl FSDP, DeepSpeed,
state-dict files, LoRA) into a validated Hugging Face safetensors directory. Plain functions: no
Celery, no HTTP. Importing the package stays light: torch loads with ``export_checkpoint``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conversion.errors import ConversionError

if TYPE_CHECKING:
    from conversion.export import export_checkpoint

__all__ = ["ConversionError", "export_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "export_checkpoint":
        from conversion.export import export_checkpoint

        return export_checkpoint
    raise AttributeError(f"module 'conversion' has no attribute {name!r}")
