"""bench/engine_gpu.py runs end to end with --tiny on the CPU: every row gets its tokens, the engine's greedy ids
equal `generate`'s (fp32), and the table names each arm."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tests.helpers import ROOT


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("engine_gpu_bench", ROOT / "bench" / "engine_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    args = ["--tiny", "--device", "cpu", "--rows", "1", "3", "--tokens", "5", "--arms", "engine", "generate"]
    [result] = bench.main(args)
    assert result["model"] == "tiny" and [c["rows"] for c in result["cells"]] == [1, 3]
    for c in result["cells"]:
        assert isinstance(c["engine"], float) and isinstance(c["generate"], float), c  # a float: no failure text
        assert c["engine_equals_generate"] == c["rows"]
        assert 0 <= c["engine_host"] <= 1
    out = capsys.readouterr().out
    assert "| tiny (0 M) | 3 x 5 |" in out and "engine ids = generate" in out
