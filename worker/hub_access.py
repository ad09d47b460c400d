"""How to load a hub model when the hub may be unreachable: one quick check instead of the hub client's retries.

Without `HF_HUB_OFFLINE`, loading a hub id from an unreachable hub spends about a minute per file in the hub
client's retries before it fails (or falls back to the cache). A worker whose model cannot be loaded must say so
within seconds, so before loading a hub id the worker asks the hub endpoint once (a few seconds at most): when it
answers, the model loads as usual; when it does not, a model in the local hub cache loads from there
(`local_files_only`), and one that is not fails at once with what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 5.0  # seconds for the one reachability check


def _unreachable(endpoint: str, timeout: float) -> str | None:
    """Why the hub endpoint cannot be reached (None: it answered, with any status)."""
    import requests

    try:
        requests.head(endpoint, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        return type(exc).__name__
    return None


def load_options(name: str, revision: str | None, timeout: float = CHECK_TIMEOUT) -> dict[str, Any]:
    """Extra `from_pretrained` options for `name`: `{}` (load as usual) or `{"local_files_only": True}` (the hub
    cannot be reached and the model is cached). Raises OSError at once when the hub cannot be reached and the
    model is not cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(name).expanduser().exists() or constants.HF_HUB_OFFLINE:
        return {}
    reason = _unreachable(constants.ENDPOINT, timeout)
    if reason is None:
        return {}
    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a repo id (a misspelled local path): let the loader say so
        return {}
    if isinstance(cached, str):
        log.warning(
            "the hub (%s) cannot be reached (%s): loading %s from the local cache", constants.ENDPOINT, reason, name
        )
        return {"local_files_only": True}
    raise OSError(
        f"the model {name!r} is not in the local hub cache and the hub ({constants.ENDPOINT}) cannot be reached "
        f"({reason}): download it where the hub is reachable (`qwen-deploy download {name}`) or set "
        "model.name_or_path to a local directory"
    )
