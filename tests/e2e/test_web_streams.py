"""The launched web server (gunicorn, default settings) keeps answering while many SSE streams are open,
and the web process never imports the model runtime (real redis-server and gunicorn, no worker)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from qwen_deploy.cli.deployment import Deployment
from qwen_deploy.cli.redis_server import free_port
from tests.helpers import ROOT

STREAMS = 60  # more than gthread's default 2 processes x 16 threads


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Redis and gunicorn with the repository's config.yml (the default web settings), as `up` starts them."""
    tmp = tmp_path_factory.mktemp("gunicorn")
    deployment = Deployment(
        {"QWEN_DEPLOY_ENV_FILE": "no.env", "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml")},
        logs=tmp,
        cwd=ROOT,
        session=True,
        quick_stop=True,
    )  # quick: streams blocked in XREAD
    try:
        deployment.start_redis(data_dir=tmp, appendonly=False)
        deployment.start_web("127.0.0.1", free_port())
        yield deployment.wait_web(60)
    finally:
        deployment.stop(timeout=30)


def open_stream(url: str, job_id: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def test_many_open_streams_leave_livez_and_submits_answering(web: str) -> None:
    job = requests.post(web + "/v1/jobs", json={"prompt": "x"}, timeout=10).json()  # stays queued: no worker
    streams = [open_stream(web, job["id"]) for _ in range(STREAMS)]
    try:
        for sock in streams:  # each stream answered its headers and first comment
            head = b""
            while b"stream of job events" not in head:
                chunk = sock.recv(4096)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 200")
        assert requests.get(web + "/livez", timeout=5).status_code == 200
        submitted = requests.post(web + "/v1/jobs", json={"prompt": "y"}, timeout=5)
        assert submitted.status_code == 202
        assert requests.get(f"{web}/v1/jobs/{submitted.json()['id']}?wait=0.5", timeout=5).json()["status"] == "queued"
    finally:
        for sock in streams:
            sock.close()


def test_the_web_app_imports_no_model_runtime(tmp_path: Path) -> None:
    code = (
        "import gevent.monkey; gevent.monkey.patch_all(); import sys, web.wsgi; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'celery', 'worker', "
        "'tasks'}); print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "QWEN_DEPLOY_ENV_FILE": "no.env", "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
