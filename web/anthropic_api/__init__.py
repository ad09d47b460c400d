"""Anthropic's Messages API over the job queue: every request is a job (no second execution path)."""

from __future__ import annotations

from typing import Any

from flask import Flask


def register(app: Flask) -> None:
    from web.anthropic_api import routes

    app.register_blueprint(routes.bp)


def document(openapi: dict[str, Any]) -> None:
    """Add these routes and their schemas to an OpenAPI document (in place; its top-level dicts are copied)."""
    from web.anthropic_api.openapi import paths, schemas

    openapi["paths"] = {**openapi["paths"], **paths()}
    components = openapi.get("components", {})
    openapi["components"] = {**components, "schemas": {**components.get("schemas", {}), **schemas()}}
