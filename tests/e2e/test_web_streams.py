"""The launched web server (gunicorn, default settings) keeps answering while many SSE streams are open,
and the web process never imports the model runtime (real redis-server and gunicorn, no worker)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from qwen_deploy.cli.launch import web_command
from qwen_deploy.cli.redis_server import RedisServer, free_port
from qwen_deploy.config import load_settings
from tests.helpers import ROOT, wait_until

STREAMS = 60  # more than gthread's default 2 processes x 16 threads


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("gunicorn")
    server = RedisServer(data_dir=tmp, appendonly=False).start()
    env = {**os.environ, "REDIS_URL": server.url, "QWEN_DEPLOY_ENV_FILE": "no.env",
           "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml")}
    settings = load_settings(environ=env)
    port = free_port()
    w = settings.web
    argv = web_command("127.0.0.1", port, w.workers, w.threads, w.worker_class, w.worker_connections)
    log = open(tmp / "web.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp / "web.log").read_text()[-2000:]
        try:
            return requests.get(url + "/livez", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(up, 60, 0.2, "gunicorn")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # quick shutdown: streams still blocked in XREAD need no grace
        proc.wait(timeout=30)
        server.stop()


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
    code = ("import gevent.monkey; gevent.monkey.patch_all(); import sys, web.wsgi; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'celery', 'worker', "
            "'tasks'}); print(bad); sys.exit(1 if bad else 0)")
    env = {**os.environ, "QWEN_DEPLOY_ENV_FILE": "no.env", "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
