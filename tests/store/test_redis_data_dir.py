"""The embedded Redis keeps its data private (0700) and one server's at a time: a second server, or a
second `up` on the machine, on the same data directory is refused with a clear message (real redis-server)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qwen_deploy.cli.deployment import Deployment
from qwen_deploy.cli.redis_server import DataDirBusy, RedisServer, reachable
from tests.helpers import ROOT


def test_the_data_directory_is_private_and_one_servers(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir(mode=0o755)
    first = RedisServer(data_dir=data).start()
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        first_url = first.url
        with pytest.raises(DataDirBusy, match="another redis-server keeps its data in"):
            RedisServer(data_dir=data).start()
        assert reachable(first_url)  # the first one is untouched
    finally:
        first.stop()
    second = RedisServer(data_dir=data).start()  # free again once the first has stopped
    try:
        second.kill()  # a crash also frees it
        RedisServer(data_dir=data, port=second.port).start().stop()
    finally:
        second.stop()


def test_a_second_up_on_one_machine_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_DEPLOY_CACHE", str(tmp_path))
    env = {"QWEN_DEPLOY_ENV_FILE": "no.env", "PATH": os.environ["PATH"]}
    first, second = Deployment(env, cwd=ROOT), Deployment(env, cwd=ROOT)
    try:
        assert first.embedded_redis() is not None
        with pytest.raises(SystemExit, match="another redis-server keeps its data in .*another `up`"):
            second.embedded_redis()
        assert second.redis is None
    finally:
        first.stop()
        second.stop()
