"""WSGI entry point: `gunicorn web.wsgi:app`."""

import gc

from web import create_app

app = create_app()
gc.freeze()  # what the app built at start-up is never scanned again by the collector (shorter pauses)
