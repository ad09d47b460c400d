"""The examples run against the live app and print what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, Stack


def test_client_example(stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "examples/client.py", "--url", stack.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("wait: ' ugly.\\nExplicit is") and line.endswith(" length") for line in lines)
    assert any(line.startswith("token: ") for line in lines)
    assert "stream: succeeded 'pass silently.'" in lines
    assert "cancel: canceled" in lines
    assert any(line.startswith("batch: line-1 ' pass silently.") for line in lines)
    assert "error: 422 max_new_tokens_too_large max_new_tokens" in lines


def test_curl_example_covers_every_route(stack: Stack) -> None:
    out = subprocess.run(["bash", "examples/curl.sh", stack.url], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert '"status": "ready"' in text.replace('":"', '": "') or '"status":"ready"' in text
    assert "event: done" in text and "event: token" in text
    assert "ugly." in text and "pass silently." in text
    assert "max_new_tokens_too_large" in text and "path_outside_root" in text and "wrong_model_task" in text
    assert '"type": "download"' in text.replace('":"', '": "') or '"type":"download"' in text
    assert "qwen_deploy_" in text
    compact = text.replace('": "', '":"')
    assert '"object":"chat.completion"' in compact and '"object":"text_completion"' in compact
    assert '"object":"response"' in compact and '"deleted":true' in compact
    doc = json.loads(
        subprocess.run(["curl", "-sS", stack.url + "/openapi.json"], capture_output=True, text=True, timeout=30).stdout
    )
    script = (ROOT / "examples" / "curl.sh").read_text()
    for path in doc["paths"]:
        stem = path.split("{")[0].rstrip("/")
        assert stem in script, f"{path} is not exercised by examples/curl.sh"


def test_readme_openai_snippet_runs_as_pasted(stack: Stack, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python", readme.index("From the OpenAI SDK")) + len("```python")
    code = readme[start : readme.index("```", start)].replace("http://127.0.0.1:8000", stack.url)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "pass silently.",  # the chat answer
        "than ugly.",  # the stream
        "completed BatchRequestCounts(completed=2, failed=0, total=2)",
        "zen-0 ugly.",
        "zen-1 pass silently.",
    ]
