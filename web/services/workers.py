"""The live generation workers as the routes see them (readiness, `/v1/models`)."""

from __future__ import annotations

from typing import Any

from qwen_deploy import registry
from qwen_deploy.model_load import MODEL_LOAD_FAILED
from qwen_deploy.served import Served
from web.context import current_services


def workers() -> list[dict[str, Any]]:
    """Every live worker child's record, newest first."""
    svc = current_services()
    return registry.workers(svc.redis, svc.settings.key_prefix)


def model_workers(found: list[dict[str, Any]], served: Served) -> dict[str, Any]:
    """A model's live workers: counts, the newest ready one, and why it is not ready (None when it is; with
    `error`, the load failure's message, when its workers could not load it)."""
    mine = registry.by_model(found, served.alias, served.default)
    ready = [w for w in mine if w.get("state") == "ready"]
    failure = registry.load_failure(found, served.alias, served.default)
    reason = None if ready else (MODEL_LOAD_FAILED if failure else "model_loading" if mine else "no_worker")
    return {
        "live": len(mine),
        "ready": len(ready),
        "newest": ready[0] if ready else None,
        "reason": reason,
        **({"error": failure} if failure else {}),
    }
