"""The job console: one static page at `/` (assets under `/static/`) that talks to the `/v1` API.

The page holds no data, so it needs no API key; its script sends the key the user types in.
Assets are served by the app's own static route: `Flask("web")` serves `web/static/` at `/static/`.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from web.openapi import TEXT, doc

bp = Blueprint("console", __name__)

STATIC = Path(__file__).resolve().parent / "static"

# Same-origin only: no CDN, no inline script, no framing; the favicon is an inline data: URL.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@bp.get("/")
@doc(media={"text/html": TEXT}, errors=(), tags=("console",))
def page() -> Response:
    """The job console (HTML); its data comes from the /v1 API with the key typed into it."""
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
