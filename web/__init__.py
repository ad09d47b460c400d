"""The HTTP front end: validates requests and enqueues jobs. Imports neither torch nor Celery."""

from __future__ import annotations

from collections.abc import Callable
from inspect import iscoroutinefunction
from typing import Any

from flask import Flask, Response

from qwen_deploy import logs
from qwen_deploy.config import Settings, get_settings
from qwen_deploy.connections import job_store, redis_client
from web.context import EXTENSION, Services
from web.request import CappedRequest


class App(Flask):
    """Flask, with the check of every view and hook for `async def` made once per function, not on every
    request (Flask asks four times for a submit), and a 413 for a chunked body over the limit."""

    request_class = CappedRequest

    def __init__(self, import_name: str) -> None:
        super().__init__(import_name)
        self._sync: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            found = self._sync.get(func)
        except TypeError:  # an unhashable callable: Flask's own check each time
            return super().ensure_sync(func)
        if found is None:
            found = self.async_to_sync(func) if iscoroutinefunction(func) else func
            if len(self._sync) < 4096:  # views, hooks and handlers: a bounded set
                self._sync[func] = found
        return found


def _nosniff(response: Response) -> Response:
    """Every answer, errors and streams included: browsers take the declared type, never a sniffed one."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def create_app(settings: Settings | None = None) -> Flask:
    """Application factory; `settings` defaults to config.yml + .env + environment."""
    settings = settings or get_settings()
    app = App(__name__)
    logs.configure(settings.log_format, settings.log_level)
    app.config.update(MAX_CONTENT_LENGTH=settings.limits.max_body_bytes)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # objects keep their documented field order
    app.extensions[EXTENSION] = Services(settings, redis_client(settings), job_store(settings))

    from web import (
        adapters,
        anthropic_api,
        auth,
        batches,
        body_reads,
        console,
        errors,
        health,
        job_actions,
        job_list,
        jobs,
        metrics,
        models,
        openai_api,
        openapi,
        reloads,
        stats,
        webhooks,
    )

    errors.register(app)
    app.after_request(_nosniff)
    auth.register(app, settings)
    body_reads.register(app, settings)  # after the key check: its slots are per key
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(job_list.bp)
    app.register_blueprint(job_actions.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(models.register_bp)
    app.register_blueprint(adapters.bp)
    app.register_blueprint(reloads.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(stats.bp)
    app.register_blueprint(console.bp)
    openai_api.register(app)
    anthropic_api.register(app)
    app.register_blueprint(webhooks.bp)
    openapi.register(app)
    return app
