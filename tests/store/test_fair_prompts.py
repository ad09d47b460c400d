"""Fair queueing charges prompt size: a key that sends megabyte prompts pushes back its own jobs, not another
key's small one (real redis-server, the web app in-process, no worker: the jobs stay pending)."""

from __future__ import annotations

from typing import Any

import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from qwen_deploy.requests import GenerationRequest
from web import create_app
from web.services import fair_cost

KA, KB = "k-fair-big-prompts", "k-fair-small"


def test_huge_prompts_do_not_get_ahead_of_another_keys_small_job(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    sections = {
        "web": {"api_keys": [KA, KB]},
        "limits": {"max_queued_unserved": 1000, "fair_tokens_per_second": 1000.0},
    }
    settings = load_settings(environ={"REDIS_URL": server.url, "QWEN_DEPLOY_ENV_FILE": "no.env"}, overrides=sections)
    http = create_app(settings).test_client()

    def submit(key: str, prompt: str) -> str:
        answer = http.post(
            "/v1/jobs", json={"prompt": prompt, "max_new_tokens": 1}, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 202, answer.get_data(as_text=True)
        return str(answer.get_json()["id"])

    huge = "Now is better than never. " * (1_000_000 // 26)
    theirs = [submit(KA, huge) for _ in range(8)]
    mine = submit(KB, "Hi")
    pending = [k for k in client.scan_iter(f"{settings.key_prefix}:pending:interactive*") if not k.endswith(":vt")]
    assert len(pending) == 1
    order = client.zrange(pending[0], 0, -1)
    assert sorted(order) == sorted([*theirs, mine])
    assert order.index(mine) <= 1  # behind at most the first of the big prompts, not behind all of them
    assert order[order.index(mine) + 1 :] == theirs[order.index(mine) :]


def test_fair_cost_grows_with_the_prompt_up_to_the_truncation() -> None:
    settings = load_settings(environ={"QWEN_DEPLOY_ENV_FILE": "no.env"}, overrides={})
    rate = settings.limits.fair_tokens_per_second
    limit = settings.generation.max_prompt_tokens

    def cost(**req: Any) -> float:
        return round(fair_cost(GenerationRequest.from_dict({"max_new_tokens": 1, **req}), settings) * rate, 6)

    assert cost(prompt="abcd" * 10) == 1 + 10
    assert cost(prompt="x" * 10_000_000) == cost(prompt="x" * (4 * limit)) == 1 + limit
    assert cost(messages=[{"role": "user", "content": "abcd" * 5}] * 2) == 1 + 10
    assert cost(prompt="abcd", n=3) == 3 + 1
