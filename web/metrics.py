"""`/metrics` in Prometheus text format, read from Redis at scrape time.

Counters and histograms live in the `{prefix}:stats` hash, written by the job and batch Lua
scripts (and by the web process for rejections), so every gunicorn process, on every host, reports
the same cluster-wide numbers: no per-process state, nothing to merge.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from qwen_deploy import registry
from qwen_deploy.lua import HISTOGRAM_BUCKETS
from qwen_deploy.queues import CONVERT
from qwen_deploy.served import served_models
from web.context import current_services
from web.openapi import TEXT, doc

bp = Blueprint("metrics", __name__)
NS = "qwen_deploy"
HISTOGRAMS = {
    "queue_seconds": "Time from submit to the first start of a job",
    "run_seconds": "Time from start to the terminal state of a job",
}


class RedisStatsCollector:
    def __init__(
        self,
        stats: dict[str, str],
        depths: dict[str, int],
        workers: list[dict[str, Any]],
        per_model: dict[str, dict[str, int]] | None = None,
    ) -> None:
        self.stats, self.depths, self.workers = stats, depths, workers
        self.per_model = per_model or {}

    def _by_prefix(self, prefix: str) -> Iterator[tuple[list[str], float]]:
        for key, value in self.stats.items():
            if key.startswith(prefix):
                yield key.removeprefix(prefix).split(":"), float(value)

    def collect(self) -> Iterator[Metric]:
        jobs = CounterMetricFamily(f"{NS}_jobs", "Jobs that reached a terminal state", labels=["type", "status"])
        for (kind, status), value in self._by_prefix("jobs:"):
            jobs.add_metric([kind, status], value)
        yield jobs
        for name, status in (("timeouts", "timed_out"), ("cancellations", "canceled")):
            total = sum(v for (_, s), v in self._by_prefix("jobs:") if s == status)
            yield CounterMetricFamily(f"{NS}_{name}", f"Jobs that ended {status}", value=total)
        yield CounterMetricFamily(
            f"{NS}_tokens_generated",
            "Completion tokens of finished generation jobs",
            value=float(self.stats.get("tokens", 0)),
        )
        rejected = CounterMetricFamily(f"{NS}_rejections", "Requests refused by the API", labels=["status"])
        for (status,), value in self._by_prefix("rejected:"):
            rejected.add_metric([status], value)
        yield rejected
        lines = CounterMetricFamily(f"{NS}_batch_lines", "Batch lines recorded", labels=["outcome"])
        for (outcome,), value in self._by_prefix("batch_lines:"):
            lines.add_metric([outcome], value)
        yield lines
        for name, text in HISTOGRAMS.items():
            buckets = [(str(b), float(self.stats.get(f"{name}_bucket:{b}", 0))) for b in HISTOGRAM_BUCKETS]
            count = float(self.stats.get(f"{name}_count", 0))
            yield HistogramMetricFamily(
                f"{NS}_{name}",
                text,
                buckets=[*buckets, ("+Inf", count)],
                sum_value=float(self.stats.get(f"{name}_sum", 0)),
            )
        depth = GaugeMetricFamily(f"{NS}_queue_depth", "Messages waiting per queue", labels=["queue"])
        for queue, value in self.depths.items():
            depth.add_metric([queue], value)
        yield depth
        work = GaugeMetricFamily(
            f"{NS}_model_queue_depth",
            "Work per model: messages on its interactive and bulk "
            "queues, and jobs its engines hold (the autoscaling metric: sum the parts)",
            labels=["model", "part"],
        )
        for alias, parts in self.per_model.items():
            for part, value in parts.items():
                work.add_metric([alias, part], value)
        yield work
        ready = [w for w in self.workers if w.get("state") == "ready"]
        yield GaugeMetricFamily(f"{NS}_workers_ready", "Generation workers with their model loaded", value=len(ready))
        load = GaugeMetricFamily(f"{NS}_model_load_seconds", "Model load time per worker", labels=["worker", "model"])
        for w in ready:
            model = w["model"]
            load.add_metric([str(w.get("name")), str(model.get("name"))], float(model.get("load_seconds") or 0))
        yield load


@bp.get("/metrics")
@doc(media={"text/plain": TEXT}, errors=(401, 403, 503), tags=("health",))
def metrics() -> Response:
    """Prometheus text: jobs, tokens, rejections, batch lines, queue and run time histograms, queue depths, workers."""
    svc = current_services()
    pipe = svc.redis.pipeline(transaction=False)
    pipe.hgetall(svc.store.stats_key())
    models = served_models(svc.settings)
    queues = (*(q for m in models for q in m.queues), CONVERT)
    for queue in queues:
        pipe.llen(svc.store.queue_key(queue))
    stats, *depths = pipe.execute()
    by_queue = dict(zip(queues, depths))
    found = registry.workers(svc.redis, svc.settings.key_prefix)
    per_model = {}
    for m in models:  # running: the jobs held by the model's live engines (one SCARD each)
        names = [str(w.get("name")) for w in registry.by_model(found, m.alias, m.default)]
        held = sum(svc.redis.scard(svc.store.held_key(n)) for n in names) if names else 0
        per_model[m.alias] = {"interactive": by_queue[m.interactive], "bulk": by_queue[m.bulk], "running": held}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RedisStatsCollector(stats, by_queue, found, per_model))
    return Response(generate_latest(reg), mimetype="text/plain; version=0.0.4; charset=utf-8")
