"""/metrics: Prometheus text with cluster-wide counters, histograms and gauges from Redis."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from qwen_deploy.client import Client
from tests.helpers import Stack, wait_until


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(stack.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_jobs_tokens_rejections_and_workers(stack: Stack, client: Client) -> None:
    before = scrape(stack)
    ok = ("qwen_deploy_jobs_total", (("status", "succeeded"), ("type", "generation")))
    canceled = ("qwen_deploy_jobs_total", (("status", "canceled"), ("type", "generation")))
    tokens = ("qwen_deploy_tokens_generated_total", ())
    r422 = ("qwen_deploy_rejections_total", (("status", "422"),))
    runs = ("qwen_deploy_run_seconds_count", ())
    for _ in range(3):
        assert client.generate("Errors should never", max_new_tokens=5)["status"] == "succeeded"
    busy = client.submit("Beautiful is better than", max_new_tokens=512, ignore_eos=True)
    wait_until(lambda: client.get(busy["id"])["progress"]["tokens"] > 0, 30, 0.005, "the busy job to run")
    # queued, or already decoding beside the busy one in the engine: either way it is canceled
    queued = client.submit("Beautiful is better than", max_new_tokens=512, ignore_eos=True)
    client.cancel(queued["id"])
    queued_ran = client.wait(queued["id"])["attempts"]  # 0 if it was canceled while queued
    client.cancel(busy["id"])
    client.wait(busy["id"])
    too_long = requests.post(stack.url + "/v1/jobs", json={"prompt": "x", "max_new_tokens": 513}, timeout=5)
    assert too_long.status_code == 422
    after = scrape(stack)
    assert after[ok] - before.get(ok, 0) == 3
    assert after[canceled] - before.get(canceled, 0) == 2
    assert after[("qwen_deploy_cancellations_total", ())] >= 2
    assert after[tokens] - before.get(tokens, 0) >= 15
    assert after[r422] - before.get(r422, 0) == 1
    assert after[runs] - before.get(runs, 0) == 4 + queued_ran  # a job canceled while queued never ran
    inf_bucket = ("qwen_deploy_queue_seconds_bucket", (("le", "+Inf"),))
    assert after[inf_bucket] == after[("qwen_deploy_queue_seconds_count", ())]
    assert after[("qwen_deploy_workers_ready", ())] == 1
    # a job canceled while queued leaves its wake-up message until the worker pops it and skips it
    depth = ("qwen_deploy_queue_depth", (("queue", "interactive"),))
    wait_until(lambda: scrape(stack)[depth] == 0, 30, 0.05, "the canceled job's message to be consumed")
    loads = [v for (name, _), v in after.items() if name == "qwen_deploy_model_load_seconds"]
    assert len(loads) == 1 and loads[0] > 0
