"""Fixtures: the demo model, and a whole stack (real redis-server, worker processes, web server)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.jobs import JobStore
from tests.helpers import Stack

FAKE_HF_TOKEN = "hf_stackTOKENneverLOGGED"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A bare redis-server for store-level tests (no workers, no web)."""
    s = RedisServer(data_dir=tmp_path_factory.mktemp("store-redis"), appendonly=False).start()
    yield s
    s.stop()


@pytest.fixture()
def store(server: RedisServer) -> JobStore:
    """A JobStore on a flushed database of `server`."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    return JobStore(client, "t", ttl=600, reap_after=60)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(log=lambda msg: None)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    """The shared deployment for end-to-end tests (default limits)."""
    s = Stack(tmp_path_factory.mktemp("stack"), demo_model, {"log_format": "json"},
              redis_url=os.environ.get("REDIS_URL"), env={"HF_TOKEN": FAKE_HF_TOKEN})
    s.start_worker()
    s.start_web()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def oai(stack: Stack):  # type: ignore[no-untyped-def]
    """The official openai SDK pointed at the shared stack (real HTTP on loopback)."""
    import openai

    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=2, timeout=60)


@pytest.fixture(scope="session")
def model(oai) -> str:  # type: ignore[no-untyped-def]
    """The served model's id, as /v1/models names it."""
    return str(oai.models.list().data[0].id)


@pytest.fixture()
def client(stack: Stack):  # type: ignore[no-untyped-def]
    return stack.client()


@pytest.fixture()
def app(stack: Stack):  # type: ignore[no-untyped-def]
    return stack.app()


@pytest.fixture()
def http(app):  # type: ignore[no-untyped-def]
    """Flask's test client on the shared stack's settings (in-process, same Redis)."""
    return app.test_client()
