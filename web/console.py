"""The job console: one static page at `/` (assets under `/static/`) that talks to the `/v1` API.

The page holds no data, so it needs no API key; its script sends the key the user types in.
Assets are served by the app's own static route: `Flask("web")` serves `web/static/` at `/static/`.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

bp = Blueprint("console", __name__)

STATIC = Path(__file__).resolve().parent / "static"

# Same-origin only: no CDN, no inline script, no framing; the favicon is an inline data: URL.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@bp.get("/")
def page() -> Response:
    response = send_from_directory(STATIC, "console.html", max_age=0)
    response.headers.update(
        {
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        }
    )
    return response
