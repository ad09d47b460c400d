"""Settings: file, .env and environment precedence; bad values stop the process naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qwen_deploy.config import ConfigError, load_settings
from tests.helpers import ROOT


def test_defaults_match_the_contract(tmp_path: Path) -> None:
    s = load_settings(environ={"QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml")})
    assert s.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (s.generation.max_new_tokens_cap, s.generation.default_max_new_tokens) == (512, 64)
    assert s.generation.max_prompt_tokens == 2048
    assert s.limits.generation_budget < s.limits.soft_time_limit < s.limits.hard_time_limit == 60
    assert s.visibility_timeout > s.limits.convert_time_limit


def test_precedence_file_then_dotenv_then_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("web: {port: 9001, workers: 3}\nmodel: {name_or_path: from-file, dtype: bf16}\n")
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9002\nHF_TOKEN=hf_secret_value\nQWEN_DEPLOY_MODEL__NAME_OR_PATH=from-dotenv\n")
    s = load_settings(
        environ={
            "QWEN_DEPLOY_CONFIG": str(cfg),
            "QWEN_DEPLOY_ENV_FILE": str(env_file),
            "QWEN_DEPLOY_MODEL__NAME_OR_PATH": "from-env",
            "REDIS_URL": "redis://h:1/2",
            "QWEN_DEPLOY_WEB__API_KEYS": '["a", "b"]',
        }
    )
    assert s.web.port == 9002 and s.web.workers == 3
    assert s.model.name_or_path == "from-env" and s.model.dtype == "bf16"
    assert s.redis_url == "redis://h:1/2"
    assert s.hf_token is not None and s.hf_token.get_secret_value() == "hf_secret_value"
    assert "hf_secret_value" not in repr(s) and "hf_secret_value" not in s.model_dump_json()
    assert [k.get_secret_value() for k in s.web.api_keys] == ["a", "b"]


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"QWEN_DEPLOY_LIMITS__HARD_TIME_LIMIT": "-1"}, "limits.hard_time_limit"),
        ({"PORT": "http"}, "web.port"),
        ({"QWEN_DEPLOY_MODEL__DEVICE": "tpu"}, "model.device"),
        ({"QWEN_DEPLOY_MODLE__DEVICE": "cpu"}, "modle"),
        ({"QWEN_DEPLOY_LIMITS__SOFT_TIME_LIMIT": "70"}, "soft_time_limit"),
        ({"QWEN_DEPLOY_GENERATION__DEFAULT_MAX_NEW_TOKENS": "600"}, "default_max_new_tokens"),
    ],
)
def test_bad_values_name_the_key(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"QWEN_DEPLOY_ENV_FILE": "none.env", **environ})
    assert needle in str(err.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(environ={"QWEN_DEPLOY_CONFIG": str(tmp_path / "nope.yml")})


def test_bad_config_stops_the_web_process_at_start() -> None:
    env = {"PATH": "/usr/bin:/bin", "QWEN_DEPLOY_LIMITS__MAX_WAIT": "soon"}
    out = subprocess.run(
        [sys.executable, "-m", "qwen_deploy.cli", "web"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "limits.max_wait" in out.stderr


@pytest.fixture()
def no_env(tmp_path: Path) -> dict[str, str]:
    """No config file, no .env: only what a test passes."""
    (tmp_path / "empty.yml").write_text("{}\n")
    return {"QWEN_DEPLOY_ENV_FILE": str(tmp_path / "none.env"), "QWEN_DEPLOY_CONFIG": str(tmp_path / "empty.yml")}


def test_models_list_and_the_single_model_as_one_entry(no_env: dict[str, str]) -> None:
    from qwen_deploy.served import find_model, for_worker, served_models

    env = no_env
    one = load_settings(environ=env, overrides={"web": {"model_aliases": ["gpt-x"]}})
    [only] = served_models(one)
    assert (only.alias, only.default, only.queues) == ("Qwen/Qwen2.5-0.5B-Instruct", True, ("interactive", "bulk"))
    assert find_model(one, "Qwen2.5-0.5B-Instruct") == find_model(one, "gpt-x") == only
    models = [
        {"alias": "big", "name_or_path": "org/big", "device": "cuda"},
        {"alias": "small.v2", "name_or_path": "org/small", "device": "cpu"},
    ]
    two = load_settings(environ=env, overrides={"models": models, "web": {"model_aliases": ["gpt-x"]}})
    big, small = served_models(two)
    assert two.model.name_or_path == "org/big" and two.model.device == "cuda"  # `model` is the default's
    assert small.queues == ("interactive.small.v2", "bulk.small.v2") and not small.default
    assert find_model(two, None) == big and find_model(two, "gpt-x") == big and find_model(two, "org/big") is None
    assert for_worker(two, {"bulk.small.v2"}) == small and for_worker(two, {"convert"}) == big
    pinned = load_settings(environ={**env, "QWEN_DEPLOY_WORKER__MODEL": "small.v2"}, overrides={"models": models})
    assert for_worker(pinned, {"interactive"}).alias == "small.v2"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"models": [{"alias": "a:b", "name_or_path": "x"}]}, "models.0.alias"),
        ({"models": [{"alias": "a", "name_or_path": "x"}, {"alias": "a", "name_or_path": "y"}]}, "unique"),
        ({"models": [{"alias": "a", "name_or_path": "x"}], "model": {"name_or_path": "y"}}, "not both"),
        (
            {
                "models": [{"alias": "a", "name_or_path": "x"}, {"alias": "b", "name_or_path": "y"}],
                "web": {"model_aliases": ["b"]},
            },
            "another model",
        ),
    ],
)
def test_bad_models_are_config_errors(overrides: dict[str, object], needle: str, no_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(environ=no_env, overrides=overrides)


def test_embed_settings_are_checked_at_start(no_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="embed_dimensions is for a model with task: embed .*key .model."):
        load_settings(environ=no_env, overrides={"model": {"embed_dimensions": [32]}})
    with pytest.raises(ConfigError, match="adapters are served for task: generate only"):
        load_settings(environ=no_env, overrides={"model": {"task": "embed", "adapters": {"a": "x"}}})
    models = [{"alias": "e", "task": "embed", "embed_dimensions": [32, 64]}]
    assert load_settings(environ=no_env, overrides={"models": models}).models[0].embed_dimensions == [32, 64]


def test_the_cpu_kernel_switch_keeps_its_former_name() -> None:
    """`model.cpu_kernel` (the C matmul) is still read under its former name `one_row_kernel`."""
    from qwen_deploy.config import Settings

    assert Settings.model_validate({"model": {}}).model.cpu_kernel is True
    assert Settings.model_validate({"model": {"cpu_kernel": False}}).model.cpu_kernel is False
    assert Settings.model_validate({"model": {"one_row_kernel": False}}).model.cpu_kernel is False
