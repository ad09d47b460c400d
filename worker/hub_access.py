"""How the worker loads a hub model when the hub may be unreachable (qwen_deploy.hub): as usual when it
answers; from the local cache (`local_files_only`) when it does not and the model is cached; otherwise the
load fails at once with what to do, instead of after the hub client's retries."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qwen_deploy.hub import HubUnreachable, cached_only

log = logging.getLogger(__name__)


def load_options(name: str, revision: str | None) -> dict[str, Any]:
    """Extra `from_pretrained` options for `name`: `{}` or `{"local_files_only": True}`; OSError at once when
    the hub does not answer and the model is not cached."""
    if Path(name).expanduser().exists():
        return {}
    try:
        offline = cached_only(name, revision)
    except HubUnreachable as exc:
        raise OSError(str(exc)) from None
    if offline:
        log.warning("the hub cannot be reached: loading %s from the local cache", name)
        return {"local_files_only": True}
    return {}
