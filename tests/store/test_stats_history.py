"""The console's activity history on a real redis-server: samples of the counters and queue depths, turned
into rates and medians."""

from __future__ import annotations

import pytest

from qwen_deploy.jobs import JobStore
from qwen_deploy.lua import HISTOGRAM_BUCKETS
from qwen_deploy.stats_history import default_queues, quantile, record_if_due, samples, series


def test_two_samples_give_rates_depths_and_medians(store: JobStore) -> None:
    stats = store.stats_key()
    store.client.hset(stats, mapping={"tokens": 100, "jobs:generation:succeeded": 3})
    assert record_if_due(store, 60, default_queues(store))
    assert not record_if_due(store, 60, default_queues(store))  # another sample within the interval: none
    store.client.hincrby(stats, "tokens", 500)
    store.client.hincrby(stats, "jobs:generation:succeeded", 4)
    store.client.hincrby(stats, "jobs:generation:failed", 2)
    for b in HISTOGRAM_BUCKETS:  # four runs: one of ≤ 0.005 s, three in (0.5, 1]
        store.client.hincrby(stats, f"run_seconds_bucket:{b}", 1 if b < 1 else 4)
    store.client.hincrby(stats, "run_seconds_count", 4)
    store.client.zadd(store.pending_key(), {"j1": 1, "j2": 2})
    store.client.rpush(store.queue_key("bulk"), "m")
    store.client.delete(store.stats_history_lock_key())
    assert record_if_due(store, 60, default_queues(store))
    kept = samples(store)
    assert len(kept) == 2 and kept[0]["t"] <= kept[1]["t"]
    (point,) = series(kept)
    span = kept[1]["t"] - kept[0]["t"]
    assert point["tokens_per_second"] == pytest.approx(500 / span, rel=0.01)
    assert point["jobs_per_minute"] == pytest.approx(6 * 60 / span, rel=0.01)
    assert point["depth"] == {"interactive": 2, "bulk": 1, "convert": 0}
    assert point["run_seconds_p50"] == pytest.approx(0.5 + 0.5 * (1 / 3), abs=1e-3)  # rank 2 of 4, inside (0.5, 1]
    assert point["queue_seconds_p50"] is None  # nothing started in the interval


def test_quantile_interpolates_within_a_bucket() -> None:
    before = [0.0] * (len(HISTOGRAM_BUCKETS) + 1)
    after = [0.0 if b < 1 else 10.0 for b in HISTOGRAM_BUCKETS] + [10.0]  # ten in (0.5, 1]
    assert quantile(0.5, before, after) == pytest.approx(0.75)
    assert quantile(0.5, after, after) is None
