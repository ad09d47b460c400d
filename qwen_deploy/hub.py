"""Whether a hub model can be loaded when the hub may be unreachable: one quick check instead of the hub
client's retries (a minute and more per file of `Retrying in 8s`). Used by the worker before it loads its model
and by the in-process CLI commands before they import torch."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


class HubUnreachable(Exception):
    """The hub does not answer and the model is not in the local cache (the message says what to do)."""


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


def cached_only(name: str, revision: str | None) -> bool:
    """For a hub id: True when the hub does not answer and the model is in the local hub cache (load it from
    there); False when it loads as usual (offline mode already, a hub that answers, or a name that is no repo
    id); HubUnreachable when the hub does not answer and the model is not cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = str(constants.ENDPOINT)
    if hub_answers(endpoint):
        return False
    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a repo id (a misspelled local path): the loader says so
        return False
    if isinstance(cached, str):
        return True
    raise HubUnreachable(
        f"the hub ({endpoint}) does not answer and the model {name} is not in the local cache. Download it "
        f"where the hub is reachable (`qwen-deploy download {name}`) or set model.name_or_path to a local "
        "directory"
    )
