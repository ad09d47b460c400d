"""OpenAI-compatible routes over the job queue: every request is a job (no second execution path)."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    from web.openai_api import batches, completions, embeddings, files, models, responses, tokenize

    for module in (completions, models, responses, files, batches, tokenize, embeddings):
        app.register_blueprint(module.bp)
