"""`qwen-deploy doctor` as a user runs it, against a real redis-server and the demo model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from qwen_deploy import registry
from qwen_deploy.cli.redis_server import RedisServer, free_port
from tests.helpers import ROOT

SECRET = "hf_doctorSECRET"
DOCTOR_TIMEOUT_S = 120
KEEP_ENV = "QWEN_DEPLOY_CACHE"


@pytest.fixture(scope="module")
def aof_redis() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()
    yield server
    server.stop()


def doctor_env(tmp: Path, redis_url: str, config: dict[str, Any], **extra: str) -> dict[str, str]:
    """A clean environment: a temp config file, REDIS_URL, no .env, no stray QWEN_DEPLOY_* keys."""
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_DEPLOY_") or k == KEEP_ENV}
    env.pop("HF_TOKEN", None)
    return {
        **env,
        "QWEN_DEPLOY_CONFIG": str(path),
        "REDIS_URL": redis_url,
        "QWEN_DEPLOY_ENV_FILE": str(tmp / "missing.env"),
        **extra,
    }


def run_doctor(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_deploy.cli", "doctor", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DOCTOR_TIMEOUT_S,
    )
    return proc.returncode, proc.stdout + proc.stderr


def doctor_json(env: dict[str, str]) -> tuple[int, dict[str, dict[str, str]], str]:
    """(exit code, rows by check name, raw output)."""
    code, out = run_doctor(env, "--json")
    start = out.index("{")
    data = json.loads(out[start : out.rindex("}") + 1])
    assert data["ok"] == (code == 0), out
    return code, {row["name"]: row for row in data["checks"]}, out


def statuses(rows: dict[str, dict[str, str]]) -> dict[str, str]:
    return {name: row["status"] for name, row in rows.items()}


def test_healthy_setup_passes_and_hides_the_token(tmp_path: Path, demo_model: Path, aof_redis: RedisServer) -> None:
    client = redis.Redis.from_url(aof_redis.url, decode_responses=True)
    client.lpush("qd:bulk", "{}")
    env = doctor_env(
        tmp_path, aof_redis.url, {"model": {"name_or_path": str(demo_model), "threads": 1}}, HF_TOKEN=SECRET
    )
    try:
        code, rows, out = doctor_json(env)
    finally:
        client.delete("bulk")
    assert code == 0, out
    status = statuses(rows)
    for name in (
        "python",
        "packages",
        "config",
        "redis",
        "redis_persistence",
        "redis_eviction",
        "queues",
        "model",
        "memory",
        "hf_token",
    ):
        assert status[name] == "pass", rows[name]
    assert status["workers"] == "warn" and rows["workers"]["fix"]
    assert "interactive 0, bulk 1, convert 0" in rows["queues"]["detail"]
    assert str(demo_model) in rows["model"]["detail"]
    assert "HF_TOKEN set" in rows["hf_token"]["detail"]
    assert SECRET not in out

    code, table = run_doctor(env)
    assert code == 0 and SECRET not in table
    assert table.splitlines()[0].split() == ["check", "status", "detail"]
    assert any(line.split()[:2] == ["redis", "pass"] for line in table.splitlines())
    assert "fix: start one: qwen-deploy worker" in table


def test_ready_worker_is_seen_and_the_worker_healthcheck_answers(
    tmp_path: Path, demo_model: Path, aof_redis: RedisServer
) -> None:
    client = redis.Redis.from_url(aof_redis.url, decode_responses=True)
    env = doctor_env(tmp_path, aof_redis.url, {"model": {"name_or_path": str(demo_model), "threads": 1}})
    healthcheck = [sys.executable, "-m", "qwen_deploy.cli", "healthcheck", "worker"]

    def probe() -> int:
        return subprocess.run(healthcheck, cwd=ROOT, env=env, capture_output=True, timeout=60).returncode

    record = {"hostname": socket.gethostname(), "state": "loading", "model": {"name": "demo"}}
    registry.publish(client, "qd", "doctor-test:1", {**record, "hostname": "elsewhere", "state": "ready"}, 30)
    assert probe() == 1  # a ready worker on another host does not make this one healthy
    registry.publish(client, "qd", "doctor-test:2", record, 30)
    assert probe() == 1  # still loading
    registry.publish(client, "qd", "doctor-test:2", {**record, "state": "ready"}, 30)
    try:
        assert probe() == 0
        code, rows, out = doctor_json(env)
        assert code == 0 and rows["workers"]["status"] == "pass", out
        assert rows["workers"]["detail"].startswith("2 ready")
    finally:
        for name in ("doctor-test:1", "doctor-test:2"):
            registry.remove(client, "qd", name)


def test_broken_setup_fails_naming_the_rows(tmp_path: Path, demo_model: Path) -> None:
    closed = f"redis://:pw-not-shown@127.0.0.1:{free_port()}/0"
    env = doctor_env(
        tmp_path,
        closed,
        {"model": {"name_or_path": str(demo_model)}},
        QWEN_DEPLOY_LIMITS__HARD_TIME_LIMIT="-1",
        HF_TOKEN=SECRET,
    )
    code, rows, out = doctor_json(env)
    assert code == 1, out
    failed = {name for name, row in rows.items() if row["status"] == "fail"}
    assert failed == {"config", "redis"}, out
    assert "limits.hard_time_limit" in rows["config"]["detail"] and rows["config"]["fix"]
    assert "unreachable" in rows["redis"]["detail"] and rows["redis"]["fix"]
    assert rows["workers"]["status"] == "warn" and "skipped" in rows["workers"]["detail"]
    assert SECRET not in out and "pw-not-shown" not in out

    code, table = run_doctor(env)
    assert code == 1 and "fail" in table and SECRET not in table


def test_redis_without_persistence_warns(tmp_path: Path, demo_model: Path) -> None:
    server = RedisServer(appendonly=False).start()
    try:
        env = doctor_env(tmp_path, server.url, {"model": {"name_or_path": str(demo_model)}})
        code, rows, out = doctor_json(env)
    finally:
        server.stop()
    assert code == 0, out
    assert rows["redis"]["status"] == "pass"
    assert rows["redis_persistence"]["status"] == "warn", out
    assert "lost on restart" in rows["redis_persistence"]["detail"] and rows["redis_persistence"]["fix"]


@pytest.mark.parametrize(
    ("model", "expected"), [("someorg/not-cached-model", "warn"), ("/nonexistent/qwen-model", "fail")]
)
def test_model_resolution(tmp_path: Path, aof_redis: RedisServer, model: str, expected: str) -> None:
    """A hub id that is not cached while the hub is unreachable warns; a missing directory fails."""
    hub = f"http://127.0.0.1:{free_port()}"  # nothing listens: the hub is unreachable, fast
    env = doctor_env(
        tmp_path,
        aof_redis.url,
        {"model": {"name_or_path": model}},
        HF_ENDPOINT=hub,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="0",
    )
    code, rows, out = doctor_json(env)
    assert rows["model"]["status"] == expected, out
    assert code == (1 if expected == "fail" else 0), out
    if expected == "warn":
        assert "unreachable" in rows["model"]["detail"]
        assert rows["hf_token"]["status"] == "warn" and "not set" in rows["hf_token"]["detail"]
        assert rows["memory"]["status"] == "warn"


@pytest.mark.parametrize(
    ("host", "keys", "expected"),
    [
        ("0.0.0.0", [], "fail"),
        ("0.0.0.0", ["k-1"], "pass"),
        ("127.0.0.1", [], "pass"),
        ("::1", [], "pass"),
        ("localhost", [], "pass"),
        ("192.168.1.5", [], "fail"),
    ],
)
def test_no_api_keys_on_a_non_loopback_bind_blocks(host: str, keys: list[str], expected: str) -> None:
    from qwen_deploy.cli.doctor import checks_system
    from qwen_deploy.cli.doctor.context import Context
    from qwen_deploy.config import load_settings

    ctx = Context()
    ctx.__dict__["config"] = (load_settings(environ={}, overrides={"web": {"host": host, "api_keys": keys}}), "")
    status, detail, fix = checks_system.check_api_keys(ctx)
    assert status == expected, detail
    assert "k-1" not in detail
    if expected == "fail":
        assert "web.api_keys" in fix and host in detail


def test_doctor_url_asks_that_web_tier_and_says_when_it_does_not_answer(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = doctor_env(tmp_path, f"redis://127.0.0.1:{free_port()}/0", {})
    code, out = run_doctor(env, "--url", f"127.0.0.1:{port}", "--json")  # no scheme: as people type it
    rows = {row["name"]: row for row in json.loads(out[out.index("{") : out.rindex("}") + 1])["checks"]}
    assert code == 1, out
    assert list(rows) == ["python", "packages", "web", "workers", "queues"]  # no local Redis rows
    assert rows["web"]["status"] == "fail" and f"http://127.0.0.1:{port} does not answer" in rows["web"]["detail"]
    assert "doctor --url" in rows["web"]["fix"]
    assert rows["workers"]["status"] == rows["queues"]["status"] == "warn"
    assert "skipped: web unavailable" in rows["workers"]["detail"]


def test_doctor_checks_the_redis_and_web_server_of_the_running_up(
    tmp_path: Path, demo_model: Path, aof_redis: RedisServer
) -> None:
    from qwen_deploy.cli.up_state import write_state

    web = f"http://127.0.0.1:{free_port()}"  # the recorded web server no longer answers
    cache = tmp_path / "cache"
    write_state(web, aof_redis.url, {"web": os.getpid()}, ["zen"], cache / "up.json")  # this process stands for up
    env = doctor_env(tmp_path, "", {"model": {"name_or_path": str(demo_model)}}, QWEN_DEPLOY_CACHE=str(cache))
    env.pop("REDIS_URL")  # no Redis configured: the one `up` recorded is checked, not 6379
    code, rows, out = doctor_json(env)
    assert code == 1, out
    assert rows["up"]["status"] == "pass" and f"zen at {web}" in rows["up"]["detail"], out
    assert rows["redis"]["status"] == "pass" and f"127.0.0.1:{aof_redis.port}" in rows["redis"]["detail"], out
    assert rows["web"]["status"] == "fail" and f"{web} does not answer" in rows["web"]["detail"], out
    assert {n for n, r in rows.items() if r["status"] == "fail"} == {"web"}, out
