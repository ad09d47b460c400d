"""The CLI as a user runs it: `up --demo` serves the demo model and stops everything it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests

from qwen_deploy.cli.redis_server import free_port
from tests.helpers import ROOT, group_alive, wait_until

pytestmark = pytest.mark.slow


def up_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of `up` with no Redis URL set anywhere (so it starts its own), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "QWEN_DEPLOY_REDIS_URL")}
    config = tmp_path / "config.yml"
    config.write_text("log_level: INFO\n")
    return {**env, "QWEN_DEPLOY_CONFIG": str(config), "QWEN_DEPLOY_ENV_FILE": str(tmp_path / "none.env"), **extra}


def run_cli(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m qwen_deploy.cli ARGV` as a user runs it, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "qwen_deploy.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """`python -m qwen_deploy.cli ARGV` started (output piped), for commands that may run side by side."""
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_deploy.cli", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def doctor_rows(proc: subprocess.Popen[str]) -> dict[str, dict[str, str]]:
    """The rows of a `doctor --json` started with start_cli, by name."""
    text, err = proc.communicate(timeout=120)
    assert "{" in text, err
    return {row["name"]: row for row in json.loads(text[text.index("{") : text.rindex("}") + 1])["checks"]}


def test_up_demo_serves_zen_and_stops_everything(tmp_path: Path, demo_model: Path) -> None:
    port = free_port()
    env = {
        **up_env(tmp_path),
        "QWEN_DEPLOY_CACHE": str(demo_model.parent),
        "QWEN_DEPLOY_ENV_FILE": str(tmp_path / "none.env"),
        "QWEN_DEPLOY_WEB__WORKERS": "1",
        "QWEN_DEPLOY_MODEL__THREADS": "1",
    }
    logs = demo_model.parent / "logs"  # up's log folder (under QWEN_DEPLOY_CACHE): what this run appends
    state_file = demo_model.parent / "up.json"
    before = {p: p.stat().st_size for p in logs.glob("*.log")} if logs.exists() else {}
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_deploy.cli", "up", "--demo", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                return requests.get(url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:  # refused, reset or slow: not ready yet
                return False

        wait_until(ready, 120, 0.25, "up --demo to be ready")
        answer = requests.post(
            url + "/v1/generate", json={"prompt": "Beautiful is better than", "max_new_tokens": 8}, timeout=60
        ).json()
        assert answer["output"]["text"].startswith(" ugly.")
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "qwen_deploy.cli",
                "generate",
                "Errors should never",
                "--max-new-tokens",
                "6",
                "--url",
                url,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0 and cli.stdout.startswith(" pass silently."), cli.stderr
        # One block once ready, with where everything is; the children's banners are in the log folder.
        wait_until(lambda: "qwen-deploy is ready" in (tmp_path / "up.log").read_text(), 60, 0.2, "the ready block")
        log = (tmp_path / "up.log").read_text()
        block = log[log.index("qwen-deploy is ready") :]
        for line in (f"API       {url}/v1", f"console   {url}/", f"API docs  {url}/docs", "stop      Ctrl-C"):
            assert line in block, block
        assert re.search(r"model     demo-model-v\d+ on cpu \(\w+\)", block), block
        assert "celery@" not in log and "SecurityWarning" not in log, log[-3000:]  # banners went to the logs
        assert list(logs.glob("worker-*.log"))
        embedded = re.search(r"started redis-server at redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", log)
        assert embedded, log[-3000:]
        with pytest.raises(redis.AuthenticationError):  # NOAUTH: the embedded server wants the password
            redis.Redis(port=int(embedded.group(1))).ping()
        # `up` records where it is; `doctor` checks that system (not 6379), or the web tier it is pointed at.
        state = json.loads(state_file.read_text())
        assert (state["url"], state["pids"]["up"], state["models"]) == (url, proc.pid, [state["models"][0]])
        assert f"127.0.0.1:{embedded.group(1)}/" in state["redis_url"] and state_file.stat().st_mode & 0o777 == 0o600
        doctor_env = {**env, "HF_HUB_OFFLINE": "1"}
        local, web = (start_cli(["doctor", "--json", *more], doctor_env) for more in ([], ["--url", url]))
        rows = doctor_rows(local)
        assert f"at {url}" in rows["up"]["detail"] and rows["up"]["status"] == "pass", rows["up"]
        assert f"127.0.0.1:{embedded.group(1)}/0" in rows["redis"]["detail"] and rows["redis"]["status"] == "pass"
        assert rows["workers"]["status"] == "pass" and rows["workers"]["detail"].startswith("1 ready"), rows
        assert rows["redis_persistence"]["status"] == "pass" and rows["web"]["status"] == "pass", rows
        assert f"{url} ready: 1 worker(s) serving demo-model" in rows["web"]["detail"]
        remote = doctor_rows(web)
        assert [remote[n]["status"] for n in ("web", "workers", "queues")] == ["pass"] * 3, remote
        assert remote["queues"]["detail"] == "interactive 0, bulk 0, convert 0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    wait_until(lambda: not group_alive(proc.pid), 30, 0.2, "every process started by up to exit")
    assert not state_file.exists()  # a clean stop removes it
    for worker_log in logs.glob("worker-*.log"):
        appended = worker_log.read_bytes()[before.get(worker_log, 0) :].decode(errors="replace")
        assert "could not remove worker registration" not in appended  # Redis stopped last


def test_up_on_a_busy_port_says_so_at_once(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli(["up", "--demo", "--port", str(port)], up_env(tmp_path), timeout=60)
    assert out.returncode == 1 and f"qwen-deploy: port {port} is in use: pass --port or set PORT" in out.stderr
    assert "started redis-server" not in out.stderr  # nothing was started


def test_up_with_an_unreachable_redis_url_is_an_error(tmp_path: Path) -> None:
    url = f"redis://:pw-hidden@127.0.0.1:{free_port()}/0"  # set explicitly, nothing listens
    out = subprocess.run(
        [sys.executable, "-m", "qwen_deploy.cli", "up"],
        cwd=ROOT,
        env=up_env(tmp_path, REDIS_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "does not answer" in out.stderr and "pw-hidden" not in out.stderr + out.stdout
    assert "started redis-server" not in out.stderr


def test_generate_local_and_demo_model_command(demo_model: Path, tmp_path: Path) -> None:
    """`demo-model` prints its directory; `generate --local` without the hub loads a cached model offline at
    once, and says in one sentence that one not cached cannot load, with none of huggingface_hub's
    retries (a minute and more)."""
    import shutil

    env = {
        **os.environ,
        "QWEN_DEPLOY_CACHE": str(demo_model.parent),
        "QWEN_DEPLOY_MODEL__NAME_OR_PATH": str(demo_model),
        "QWEN_DEPLOY_ENV_FILE": str(tmp_path / "x"),
    }
    out = run_cli(["demo-model"], env)
    assert out.returncode == 0 and out.stdout.strip() == str(demo_model)

    hub = f"http://127.0.0.1:{free_port()}"  # nothing listens: the hub does not answer
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--zen" / "snapshots" / ("0" * 40)
    shutil.copytree(demo_model, snapshot)  # a hub cache built by hand, as a download leaves it
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env.update(HF_ENDPOINT=hub, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    argv = ["generate", "Beautiful is better than", "--max-new-tokens", "4", "--local"]
    cached = run_cli(argv, {**env, "QWEN_DEPLOY_MODEL__NAME_OR_PATH": "someorg/zen"})
    assert cached.returncode == 0 and cached.stdout.startswith(" ugly."), cached.stderr[-2000:]
    missing = run_cli(argv, {**env, "QWEN_DEPLOY_MODEL__NAME_OR_PATH": "someorg/not-cached"})
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr[-2000:]
    assert missing.stderr.startswith(
        f"qwen-deploy: the hub ({hub}) does not answer and the model someorg/not-cached is not in the local cache."
    )
    assert "Retrying" not in missing.stderr + cached.stderr


def test_export_command_prints_the_report_and_fails_clearly(
    demo_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_deploy.cli import main

    state = AutoModelForCausalLM.from_pretrained(demo_model).state_dict()
    state["model.norm.weight"] = state["model.norm.weight"] * 1.001
    torch.save({f"_orig_mod.{k}": v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "ckpt.pt")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt.pt"), "--base", str(demo_model), "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"]["logits_match"]["ok"] and (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(SystemExit) as failed:
        main(["export", str(tmp_path / "nope.pt"), "--base", str(demo_model), "--out", str(tmp_path / "out3")])
    assert "export failed" in str(failed.value.code)
    assert not (tmp_path / "out3").exists()


def test_up_takes_a_model_or_the_demo_not_both(tmp_path: Path) -> None:
    from qwen_deploy.cli import build_parser
    from qwen_deploy.cli.serve import cmd_up

    args = build_parser().parse_args(["up", "--model", str(tmp_path / "my-model")])
    assert args.func is cmd_up and args.model == str(tmp_path / "my-model") and not args.demo
    both = run_cli(["up", "--demo", "--model", "x"], timeout=60)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["generate", "hi", "--url", "127.0.0.1:{port}"], "cannot reach the API at http://127.0.0.1:{port}"),
        (["generate", "hi", "--url", "http://127.0.0.1:{port}"], "is `qwen-deploy up` running there?"),
        (["analyze", "{tmp}/missing.jsonl", "--out", "{tmp}/out.jsonl"], "{tmp}/missing.jsonl: No such file"),
        (["download", "not a repo"], "not a Hugging Face repo id or local directory"),
        (["generate", "hi", "--local"], "the model directory {tmp}/no-such-model does not exist"),
    ],
)
def test_user_mistakes_are_one_sentence_and_exit_1(tmp_path: Path, argv: list[str], expected: str) -> None:
    """A server that is down, a URL without a scheme, a missing file, a bad repo id, a misspelled model
    directory: one `qwen-deploy: …` line on stderr, exit 1, no traceback."""
    port = str(free_port())  # nothing listens there
    env = {
        **up_env(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "QWEN_DEPLOY_MODEL__NAME_OR_PATH": f"{tmp_path}/no-such-model",
    }
    fill = {"port": port, "tmp": str(tmp_path)}
    out = run_cli([a.format(**fill) for a in argv], env)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("qwen-deploy: ")]
    assert len(lines) == 1 and expected.format(**fill) in lines[0], out.stderr
