"""WSGI entry point: `gunicorn web.wsgi:app`."""

import gc

from web import create_app, probe
from web.context import EXTENSION

app = create_app()
_web = app.extensions[EXTENSION].settings.web
if _web.probe_port:  # a liveness listener of this process's own, outside gunicorn's connection pool
    probe.start(_web.host, _web.probe_port)
gc.freeze()  # what the app built at start-up is never scanned again by the collector (shorter pauses)
