"""Fixtures: the demo model, and whole stacks (real redis-server, worker processes, web server); the layer
markers by folder. The store layer's redis-server and flushed JobStore are in tests/store/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Stack

FAKE_HF_TOKEN = "hf_stackTOKENneverLOGGED"

# A stored request with a key its type does not know fails its job (production logs and ignores the key);
# set before any stack starts, so every worker process the suite starts inherits it.
os.environ["QWEN_DEPLOY_GENERATION__STRICT_REQUESTS"] = "true"

# tests/<layer>/...: each test gets its folder's marker (`-m unit`, `-m "not e2e"`, ...).
LAYERS = ("unit", "store", "e2e", "browser")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (in addopts): one process more than the cores (three on two) for the whole suite, none (plain
    pytest) for chosen files.

    Most tests wait on subprocesses (workers, redis-server, clients), so a third process on two cores overlaps
    those waits (the suite measured 322 s with three against 347-372 s with two on this 2-core box); more would
    mostly duplicate the session fixtures. PYTEST_XDIST_AUTO_NUM_WORKERS overrides, as in pytest-xdist."""
    if "PYTEST_XDIST_AUTO_NUM_WORKERS" in os.environ:
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    whole_suite = all(Path(arg).resolve() == config.rootpath / "tests" for arg in config.args)
    return min(3, (os.cpu_count() or 1) + 1) if whole_suite else 0


@pytest.hookimpl(tryfirst=True)  # the markers are set before `-m` deselects by them
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets the marker of its layer folder. Files marked slow first, each kept whole (stable sort):
    with `--dist loadfile` a file runs in one process, and starting the long ones first leaves no long file
    for the end."""
    tests = config.rootpath / "tests"
    for item in items:
        parts = item.path.relative_to(tests).parts if item.path.is_relative_to(tests) else ()
        if len(parts) > 1 and parts[0] in LAYERS:
            item.add_marker(parts[0])

    def slow(item: pytest.Item) -> bool:
        module = item.getparent(pytest.Module)
        return module is not None and module.get_closest_marker("slow") is not None

    items.sort(key=lambda item: not slow(item))


def _redis_url() -> str | None:
    """REDIS_URL for the shared stack; each pytest-xdist process takes its own database (db + worker number)."""
    url = os.environ.get("REDIS_URL")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    if url is None or worker == "gw0":
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0) + int(worker.removeprefix("gw"))
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(log=lambda msg: None)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    """The shared deployment for end-to-end tests (default limits)."""
    s = Stack(
        tmp_path_factory.mktemp("stack"),
        demo_model,
        {"log_format": "json"},
        redis_url=_redis_url(),
        env={"HF_TOKEN": FAKE_HF_TOKEN},
    )
    s.start_worker()
    s.start_web()
    yield s
    s.stop()


StackFactory = Callable[..., Stack]


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[StackFactory]:
    """Builds Stacks for one module (own redis-server unless `redis_url`; the demo model unless `model`), each
    under its own tmp dir, and stops every one it made at the module's end. Nothing is started: the caller
    starts the workers and web server it needs."""
    made: list[Stack] = []

    def build(
        config: dict[str, Any] | None = None,
        model: Path | None = None,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        name: str = "stack",
    ) -> Stack:
        s = Stack(tmp_path_factory.mktemp(name), model or demo_model, config, redis_url=redis_url, env=env)
        made.append(s)
        return s

    yield build
    with ExitStack() as stops:  # every one is stopped, even past a failing stop
        for s in made:
            stops.callback(s.stop)


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


@pytest.fixture(params=["c", "tensor"])
def sampler_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sampler's C pass (where it runs here) or its tensor path: a test of `choose` using this runs on both."""
    from worker.engine import cpu_sampler

    if request.param == "tensor":
        monkeypatch.setattr(cpu_sampler, "usable", lambda *_: False)
    return str(request.param)
