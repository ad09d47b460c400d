"""The lifecycle routes on a real redis-server with no worker consuming (in-process web app): deadlines
of queued jobs, priorities and positions, retry, the queue overview and the admin purge, per owner."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from tests.helpers import wait_until
from web import create_app
from web.openai_api.translate import model_id

K1, K2, ADMIN = "k-life-one", "k-life-two", "k-life-admin"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture()
def http(server: RedisServer) -> Any:
    redis.Redis.from_url(server.url).flushdb()
    settings = load_settings(
        environ={"REDIS_URL": server.url, "QWEN_DEPLOY_ENV_FILE": "no.env"},
        overrides={
            "web": {"api_keys": [K1, K2], "admin_keys": [ADMIN]},
            "webhooks": {"allowed_hosts": ["127.0.0.1"], "secret": SECRET},
        },
    )
    return create_app(settings).test_client()


def auth(key: str = K1, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def post(http: Any, body: dict[str, Any], key: str = K1, **headers: str) -> Any:
    return http.post("/v1/jobs", json={"prompt": "x", "max_new_tokens": 4, **body}, headers=auth(key, **headers))


def test_a_queued_job_ends_canceled_at_its_deadline(http: Any) -> None:
    short = post(http, {}, **{"Cancel-After": "500ms"})
    assert short.status_code == 202
    job = short.get_json()
    assert job["deadline"] == pytest.approx(time.time() + 0.5, abs=0.5) and job["priority"] == "normal"
    body = post(http, {"deadline_seconds": 0.4}, **{"Cancel-After": "1h"}).get_json()  # the earlier wins
    assert body["deadline"] - body["created_at"] == pytest.approx(0.4, abs=0.05)
    later = post(http, {"deadline_seconds": 600}).get_json()
    done = wait_until(
        lambda: (j := http.get(f"/v1/jobs/{job['id']}", headers=auth()).get_json())["status"] == "canceled" and j,
        10,
        what="the deadline",
    )
    assert done["error"]["code"] == "deadline_exceeded" and done["attempts"] == 0 and done["started_at"] is None
    assert done["completed_at"] >= done["deadline"]
    assert http.get(f"/v1/jobs/{later['id']}", headers=auth()).get_json()["status"] == "queued"
    listed = http.get("/v1/jobs?status=canceled", headers=auth()).get_json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]  # the other short one: not read yet (the sweep's job)


@pytest.mark.parametrize(
    ("headers", "body", "status", "param"),
    [
        ({"Cancel-After": "soon"}, {}, 400, "Cancel-After"),
        ({"Cancel-After": "0s"}, {}, 400, "Cancel-After"),
        ({"Cancel-After": "48h"}, {}, 400, "Cancel-After"),
        ({}, {"deadline_seconds": 0}, 422, "deadline_seconds"),
        ({}, {"deadline_seconds": "30s"}, 422, "deadline_seconds"),
        ({}, {"deadline_seconds": 86401}, 422, "deadline_seconds"),
        ({}, {"priority": "urgent"}, 422, "priority"),
    ],
)
def test_bad_lifecycle_options_are_refused_with_param(
    http: Any, headers: dict[str, str], body: dict[str, Any], status: int, param: str
) -> None:
    response = post(http, body, **headers)
    assert response.status_code == status
    assert response.get_json()["error"]["param"] == param
    assert http.get("/v1/jobs", headers=auth()).get_json()["data"] == []  # nothing was queued


def test_positions_follow_priority_and_shrink_as_jobs_leave(http: Any, server: RedisServer) -> None:
    low = post(http, {"priority": "low"}).get_json()
    normal = [post(http, {}).get_json() for _ in range(3)]
    high = post(http, {"priority": "high"}, key=K2).get_json()  # positions count every owner's jobs

    def position(job: dict[str, Any], key: str = K1) -> Any:
        return http.get(f"/v1/jobs/{job['id']}", headers=auth(key)).get_json()["queue_position"]

    assert position(high, K2) == 0
    assert [position(j) for j in normal] == [1, 2, 3]
    assert position(low) == 4
    listed = {j["id"]: j["queue_position"] for j in http.get("/v1/jobs", headers=auth()).get_json()["data"]}
    assert listed == {low["id"]: 4, **{j["id"]: i + 1 for i, j in enumerate(normal)}}
    assert http.post(f"/v1/jobs/{normal[0]['id']}/cancel", headers=auth()).status_code == 202
    store = http.application.extensions["qwen_deploy"].store  # the app's own (its default model)
    claimed = store.claim("host:1", 30, 2, 1)  # an engine takes the next one: the high-priority job
    assert [c.job_id for c in claimed] == [high["id"]]
    assert [position(j) for j in normal[1:]] == [0, 1] and position(low) == 2
    assert http.get(f"/v1/jobs/{high['id']}", headers=auth(K2)).get_json()["queue_position"] is None


def test_a_job_claimed_while_its_get_runs_is_shown_running_not_queued_without_a_position(
    http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET reads the record, then the pending set: an engine's claim between the two must not give a
    queued job with no `queue_position` (the contract gives every queued job one)."""
    from web.services import records

    job = post(http, {}).get_json()
    store = http.application.extensions["qwen_deploy"].store
    reads = records.current

    def claimed_in_between(store_: Any, record: dict[str, str]) -> dict[str, str]:
        if not store.client.hexists(store.key(job["id"]), "worker"):
            assert [c.job_id for c in store.claim("host:1", 30, 2, 1)] == [job["id"]]
        return reads(store_, record)

    monkeypatch.setattr(records, "current", claimed_in_between)
    seen = http.get(f"/v1/jobs/{job['id']}", headers=auth()).get_json()
    assert (seen["status"], seen["queue_position"], seen["attempts"]) == ("running", None, 1), seen


def test_one_keys_backlog_does_not_hold_another_keys_job_back(http: Any) -> None:
    backlog = [post(http, {"max_new_tokens": 64}).get_json() for _ in range(12)]
    other = post(http, {"max_new_tokens": 64}, key=K2).get_json()
    assert [j["queue_position"] for j in backlog] == list(range(12))
    assert other["queue_position"] <= 1  # behind at most the job K1 had queued first, not all 12


def test_retry_makes_a_linked_job_with_the_same_request_for_the_same_owner(http: Any, server: RedisServer) -> None:
    hook = {"webhook": "http://127.0.0.1:9/hook", "webhook_events_filter": ["completed"]}
    first = post(http, {"prompt": "again", "priority": "high", "deadline_seconds": 600, **hook}).get_json()
    early = http.post(f"/v1/jobs/{first['id']}/retry", headers=auth())
    assert early.status_code == 409 and early.get_json()["error"]["code"] == "job_not_finished"
    http.post(f"/v1/jobs/{first['id']}/cancel", headers=auth())
    assert http.post(f"/v1/jobs/{first['id']}/retry", headers=auth(K2)).status_code == 404  # another owner
    assert http.post("/v1/jobs/job_nope/retry", headers=auth()).status_code == 404
    again = http.post(f"/v1/jobs/{first['id']}/retry", headers=auth())
    assert again.status_code == 201
    job = again.get_json()
    assert job["retry_of"] == first["id"] and job["id"] != first["id"] and job["status"] == "queued"
    assert again.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["priority"] == "high" and job["deadline"] - job["created_at"] == pytest.approx(600, abs=1)
    store = http.application.extensions["qwen_deploy"].store  # the app's own (its default model)
    old, new = store.get(first["id"]), store.get(job["id"])
    assert json.loads(new["request"]) == json.loads(old["request"])
    assert new["owner"] == old["owner"] and new["webhook"] == hook["webhook"]
    ids = [j["id"] for j in http.get("/v1/jobs", headers=auth()).get_json()["data"]]
    assert ids == [job["id"], first["id"]]
    assert http.get("/v1/jobs", headers=auth(K2)).get_json()["data"] == []


def test_purge_needs_an_admin_key_and_ends_the_queued_jobs(http: Any) -> None:
    jobs = [post(http, {}, key=key).get_json() for key in (K1, K2, K1)]
    overview = http.get("/v1/queues", headers=auth()).get_json()
    assert {q["name"]: q["depth"] for q in overview["data"]}["interactive"] == 3 and overview["workers"] == 0
    refused = http.post("/v1/queues/interactive/purge", headers=auth())
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "admin_required"
    assert http.post("/v1/queues/nope/purge", headers=auth(ADMIN)).status_code == 404
    done = http.post("/v1/queues/interactive/purge", headers=auth(ADMIN))
    assert done.status_code == 200 and done.get_json() == {
        "object": "queue.purged",
        "queue": "interactive",
        "purged": 3,
    }
    for job, key in zip(jobs, (K1, K2, K1)):
        record = http.get(f"/v1/jobs/{job['id']}", headers=auth(key)).get_json()
        assert record["status"] == "canceled" and record["error"]["code"] == "purged"
    overview = http.get("/v1/queues", headers=auth()).get_json()
    assert {q["name"]: q["depth"] for q in overview["data"]}["interactive"] == 0


def test_openai_service_tier_sets_the_priority(http: Any) -> None:
    model = model_id(http.application.extensions["qwen_deploy"].settings)
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "service_tier": "gold"}
    bad = http.post("/v1/chat/completions", headers=auth(), json=chat)
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "service_tier"
    tiers = {}
    for tier in ("flex", "priority", "default", None):
        body = {"model": model, "input": "hi", "background": True, **({"service_tier": tier} if tier else {})}
        made = http.post("/v1/responses", headers=auth(), json=body)
        assert made.status_code == 200, made.get_json()
        job = http.get(f"/v1/jobs/{made.headers['X-Job-Id']}", headers=auth()).get_json()
        tiers[tier] = (job["priority"], job["queue_position"])
    assert tiers == {"flex": ("low", 0), "priority": ("high", 0), "default": ("normal", 1), None: ("normal", 2)}
