"""Loading a hub id when the hub cannot be reached: one quick check, then the local cache or a clear error at once
(the hub client alone retries for about a minute per file). Traffic goes only to loopback stand-ins."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from qwen_deploy.cli.redis_server import free_port
from qwen_deploy.config import get_settings
from worker import hub_access
from worker.handler import ModelHandler

REPO = "example-org/tiny-model"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty hub cache, hub access on (no offline mode) and the endpoint a closed loopback port."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    return cache


@pytest.fixture
def answering_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()


def cache_snapshot(cache: Path, repo: str) -> None:
    """A hub cache entry as `snapshot_download` leaves it: refs/main naming a snapshot holding config.json."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")


def test_an_uncached_model_fails_at_once_with_what_to_do(hub: Path) -> None:
    with pytest.raises(OSError) as raised:
        hub_access.load_options(REPO, None)
    message = str(raised.value)
    assert "not in the local cache" in message and "does not answer" in message
    assert f"qwen-deploy download {REPO}" in message and "local directory" in message


def test_the_worker_load_fails_with_that_reason(hub: Path) -> None:
    settings = get_settings()
    handler = ModelHandler(
        settings.model_copy(update={"model": settings.model.model_copy(update={"name_or_path": REPO})})
    )
    with pytest.raises(OSError, match="does not answer"):
        handler.setup()


def test_a_cached_model_loads_from_the_cache(hub: Path) -> None:
    cache_snapshot(hub, REPO)
    assert hub_access.load_options(REPO, None) == {"local_files_only": True}


def test_a_reachable_hub_or_a_local_directory_loads_as_usual(
    hub: Path, answering_endpoint: None, tmp_path: Path
) -> None:
    assert hub_access.load_options(REPO, None) == {}
    assert hub_access.load_options(str(tmp_path), None) == {}
