"""Before an in-process command loads a hub model: when the hub does not answer, use the local cache at
once (offline mode) or say in one sentence that the model is not there, instead of waiting through
huggingface_hub's retries (a minute and more of `Retrying in 8s`)."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

from qwen_deploy.cli.errors import ModelLoadError, looks_like_path

PROBE_TIMEOUT_S = 3.0


def hub_answers(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` (name lookup included: it runs in a
    thread, since a lookup that hangs ignores socket timeouts)."""
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def prepare_hub_model(name: str, revision: str | None) -> None:
    """For a hub id when the hub does not answer: offline mode if the model is cached, else ModelLoadError.
    A local directory, an offline run already, or a hub that answers: nothing to do."""
    if looks_like_path(name):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return
    endpoint = str(constants.ENDPOINT)
    if hub_answers(endpoint):
        return
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
        return
    raise ModelLoadError(
        f"the hub ({endpoint}) does not answer and the model {name} is not in the local cache. Download it "
        "where the hub is reachable (`qwen-deploy download ORG/NAME`), point model.name_or_path at a local "
        "model directory, or try the demo model (`--demo`)."
    )
