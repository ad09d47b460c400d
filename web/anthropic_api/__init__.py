"""Anthropic's Messages API over the job queue: every request is a job (no second execution path)."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    from web.anthropic_api import routes

    app.register_blueprint(routes.bp)
