"""Before an in-process command loads a hub model: when the hub does not answer, use the local cache at
once (offline mode) or say in one sentence that the model is not there (qwen_deploy.hub)."""

from __future__ import annotations

from qwen_deploy.cli.errors import ModelLoadError, looks_like_path
from qwen_deploy.hub import HubUnreachable, cached_only


def prepare_hub_model(name: str, revision: str | None) -> None:
    """For a hub id when the hub does not answer: offline mode if the model is cached, else ModelLoadError.
    A local directory, an offline run already, or a hub that answers: nothing to do."""
    if looks_like_path(name):
        return
    try:
        offline = cached_only(name, revision)
    except HubUnreachable as exc:
        raise ModelLoadError(f"{exc}, or try the demo model (`--demo`).") from None
    if offline:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
