"""OpenAI-compatible routes over the job queue: every request is a job (no second execution path)."""

from __future__ import annotations

from flask import Flask, Response, g


def register(app: Flask) -> None:
    from web.openai_api import batches, completions, files, models, responses

    for module in (completions, models, responses, files, batches):
        app.register_blueprint(module.bp)

    @app.after_request
    def _job_headers(response: Response) -> Response:
        job_id = g.get("openai_job_id")
        if job_id:
            response.headers["X-Job-Id"] = job_id
            if response.status_code >= 400:
                response.headers.setdefault("x-should-retry", "false")
        return response
