"""Checks of a running system: the `up` that runs here (its state file), and a web tier asked over HTTP
(`doctor --url`, or the web server `up` recorded)."""

from __future__ import annotations

import time
from typing import Any

import requests

from qwen_deploy.cli.common import redacted
from qwen_deploy.cli.doctor.context import Context, Outcome, passed
from qwen_deploy.cli.up_state import state_path

WEB_TIMEOUT_S = 5.0
FIX_WORKER = "start one: qwen-deploy worker (or docker compose up -d worker)"
FIX_WEB = "start it (qwen-deploy up), or pass the address it serves: doctor --url http://host:port"


def check_up(ctx: Context) -> Outcome:
    """Which system the other rows look at: the one `up` started here, else the configured one."""
    state = ctx.up
    if state is None and ctx.running_up:
        return passed(
            f"qwen-deploy up runs at {ctx.running_up.get('url')}, but the settings name another Redis: checking that"
        )
    if state is None:
        return passed(f"no qwen-deploy up running here ({state_path()}); checking the configured Redis")
    since = time.strftime("%H:%M:%S", time.localtime(float(state.get("started_at") or 0)))
    models = ", ".join(str(m) for m in state.get("models") or []) or "?"
    return passed(
        f"running since {since} (pid {state['pids'].get('up')}): {models} at {state.get('url')}, "
        f"Redis {redacted(str(state.get('redis_url')))}"
    )


def _get(ctx: Context, path: str) -> tuple[int, Any]:
    """(status, JSON body) of GET `path` on the web tier (with this host's key); raises RequestException."""
    key = ctx.config[0].client_key if ctx.config[0] else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = requests.get(ctx.web_url + path, headers=headers, timeout=WEB_TIMEOUT_S)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {}


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else "no reason given"


def check_web(ctx: Context) -> Outcome:
    """The web tier answers and is ready (/readyz: Redis answers and a worker has its model loaded)."""
    try:
        status, body = _get(ctx, "/readyz")
    except requests.RequestException as exc:
        return "fail", f"{ctx.web_url} does not answer: {type(exc).__name__}", FIX_WEB
    if status == 200:
        return passed(f"{ctx.web_url} ready: {body.get('workers')} worker(s) serving {body.get('model')}")
    if status == 401:
        return "fail", f"{ctx.web_url} wants an API key", "set web.api_keys (or QWEN_DEPLOY_WEB__API_KEYS) here too"
    code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
    if code == "model_loading":
        return "warn", f"{ctx.web_url} answers; {_message(body)}", "wait for the load (the log folder shows it)"
    return "fail", f"{ctx.web_url} is not ready ({status}): {_message(body)}", "see the workers' logs"


def check_web_workers(ctx: Context) -> Outcome:
    """Each served model's workers, as the web tier sees them (GET /v1/models)."""
    status, body = _get(ctx, "/v1/models")
    if status != 200:
        return "fail", f"GET /v1/models answered {status}: {_message(body)}", "see the web server's log"
    models = body.get("data") or []
    parts = [f"{m.get('id')}: {m.get('workers')} ready" + ("" if m.get("ready") else " (not ready)") for m in models]
    if models and all(m.get("ready") for m in models):
        return passed(", ".join(parts))
    return "warn", ", ".join(parts) or "no model served", FIX_WORKER


def check_web_queues(ctx: Context) -> Outcome:
    """Jobs waiting per queue (GET /v1/queues)."""
    status, body = _get(ctx, "/v1/queues")
    if status != 200:
        return "fail", f"GET /v1/queues answered {status}: {_message(body)}", "see the web server's log"
    return passed(", ".join(f"{q.get('name')} {q.get('depth')}" for q in body.get("data") or []))
