"""OpenAI routes under other web settings (a second web server on the shared stack's Redis and worker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from qwen_deploy.keys import JobKeys
from tests.helpers import Stack

CHAT = [{"role": "user", "content": "Errors should never"}]


@pytest.fixture(scope="module")
def short_web(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, stack: Stack) -> Iterator[str]:
    """Web waits only ~1 s + grace for a job (the worker keeps its own limits); 2 KiB uploads; a model alias."""
    config = {
        "limits": {"generation_budget": 0.3, "soft_time_limit": 0.5, "hard_time_limit": 1},
        "files": {"max_bytes": 2048},
        "web": {"model_aliases": ["zen"]},
    }
    web = Stack(tmp_path_factory.mktemp("short-web"), demo_model, config, redis_url=stack.redis_url)
    try:
        yield web.start_web() + "/v1"
    finally:
        web.stop()


def test_past_the_time_limit_the_answer_is_200_length_and_never_a_retry(short_web: str, stack: Stack) -> None:
    oai = openai.OpenAI(base_url=short_web, api_key="unused", max_retries=2, timeout=60)
    before = {
        k for k in stack.redis.scan_iter(JobKeys(stack.settings.key_prefix).key("job_*")) if not k.endswith(":ev")
    }
    raw = oai.chat.completions.with_raw_response.create(
        model="zen", messages=CHAT, max_tokens=512, extra_body={"ignore_eos": True}
    )
    done = raw.parse()
    after = {k for k in stack.redis.scan_iter(JobKeys(stack.settings.key_prefix).key("job_*")) if not k.endswith(":ev")}
    assert [k.rsplit(":", 1)[-1] for k in after - before] == [raw.headers["X-Job-Id"]]  # one job, no retry
    assert done.choices[0].finish_reason == "length"
    if stack.record(raw.headers["X-Job-Id"])["status"] == "canceled":  # else it finished 512 tokens within ~2 s
        assert 0 < done.usage.completion_tokens < 512 and done.choices[0].message.content.startswith("pass")


def test_upload_cap(short_web: str) -> None:
    oai = openai.OpenAI(base_url=short_web, api_key="unused", max_retries=0)
    assert oai.files.create(file=("ok.jsonl", b"x" * 2048), purpose="batch").bytes == 2048
    with pytest.raises(openai.APIStatusError) as err:
        oai.files.create(file=("big.jsonl", b"x" * 2049), purpose="batch")
    assert err.value.status_code == 413 and err.value.body["code"] == "body_too_large"
