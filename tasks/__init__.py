"""Celery application and thin task wrappers (`celery -A tasks worker` works)."""

from tasks.app import app

celery = app

__all__ = ["app", "celery"]
