"""The assembly `up`, the tests and bench/ share (`qwen_deploy.cli.deployment`): the readiness wait
reports a web server that cannot start, with its log, and stop() leaves none of its processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from qwen_deploy.cli.deployment import Deployment
from qwen_deploy.cli.redis_server import free_port
from tests.helpers import ROOT, group_alive, wait_until


def deployment(tmp: Path) -> Deployment:
    env = {
        "QWEN_DEPLOY_ENV_FILE": "no.env",
        "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml"),
        "QWEN_DEPLOY_WEB__WORKERS": "1",
    }
    return Deployment(env, logs=tmp, cwd=ROOT, session=True, quick_stop=True)


def test_a_web_server_that_cannot_bind_is_reported_with_its_log(tmp_path: Path) -> None:
    d = deployment(tmp_path)
    with socket.socket() as taken:  # listens and never answers: the probe's reads time out meanwhile
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            d.start_redis(data_dir=tmp_path / "redis", appendonly=False)
            d.start_web("127.0.0.1", taken.getsockname()[1])
            with pytest.raises(RuntimeError, match="the web server exited") as failed:
                d.wait_web(60)
            assert "in use" in str(failed.value)  # gunicorn's own words, from web.log
        finally:
            d.stop()


def test_stop_ends_every_process_it_started(tmp_path: Path) -> None:
    d = deployment(tmp_path)
    try:
        redis = d.start_redis(data_dir=tmp_path / "redis", appendonly=False)
        web = d.start_web("127.0.0.1", free_port())
        assert d.wait_web(60) == d.url
    finally:
        d.stop()
    assert redis.proc is not None and redis.proc.poll() is not None
    wait_until(lambda: not group_alive(web.pid), 30, 0.1, "gunicorn's master and workers to exit")
    assert d.supervisor.children == [] and d.web is None
