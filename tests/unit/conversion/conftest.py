"""Tiny Qwen2 bases (tied and untied embeddings), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conversion.layouts import Tiny, make_tiny, quiet_transformers


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    quiet_transformers()
    return tmp_path_factory.mktemp("tiny-bases")


@pytest.fixture(scope="session")
def tied(tiny_root: Path) -> Tiny:
    return make_tiny(tiny_root, tied=True)


@pytest.fixture(scope="session")
def untied(tiny_root: Path) -> Tiny:
    return make_tiny(tiny_root, tied=False)
