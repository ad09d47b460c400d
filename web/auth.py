"""Bearer API keys: when any are configured, every route but /livez needs one."""

from __future__ import annotations

import hmac

from flask import Flask, request

from qwen_deploy.config import Settings
from qwen_deploy.errors import Unauthorized

OPEN_PATHS = frozenset({"/livez", "/"})  # the console page holds no data; its API calls send the key
OPEN_PREFIXES = ("/static/",)


def register(app: Flask, settings: Settings) -> None:
    keys = [k.get_secret_value().encode() for k in settings.web.api_keys if k.get_secret_value()]
    if not keys:
        return

    @app.before_request
    def _check_key() -> None:
        if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return
        header = request.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").strip().encode() if header.startswith("Bearer ") else b""
        # Compare against every key so timing does not tell which one nearly matched.
        matched = False
        for key in keys:
            matched |= bool(given) and hmac.compare_digest(given, key)
        if not matched:
            raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)",
                               param="Authorization")
