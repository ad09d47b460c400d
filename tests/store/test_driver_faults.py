"""The engine driver on a real Redis and the demo model: a job whose result cannot be built fails alone with
`generation_error`, and the driver goes on serving the next job (it once retried the same job at every step,
forever, so neither job ever ended)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from qwen_deploy.connections import job_store
from qwen_deploy.job_records import new_job_id
from qwen_deploy.queues import GENERATE_TASK, Lane, task_message
from tests.unit.test_handler import make_handler
from worker.driver import Driver


def test_a_result_that_raises_fails_its_job_and_the_next_one_runs(server: Any, demo_model: Path) -> None:
    handler = make_handler(str(demo_model), redis_url=server.url, key_prefix="faults")
    store = job_store(handler.settings)
    driver = Driver(handler, store, "host:1")
    ids = []
    for prompt in ("Beautiful is", "Simple is"):
        job_id = new_job_id()
        message = task_message(GENERATE_TASK, job_id, Lane.INTERACTIVE.queue, [job_id])
        request = {"prompt": prompt, "max_new_tokens": 4, "ignore_eos": True}
        fields = {"type": "generation", "request": json.dumps(request)}
        store.submit(job_id, Lane.INTERACTIVE.queue, message, fields, 100, engine=True)
        ids.append(job_id)
    real_result, calls = handler.result, []

    def result(seqs: Any, *args: Any) -> Any:
        calls.append(seqs[0].key)
        if len(calls) == 1:
            raise KeyError("text")  # a defect in building the first job's result
        return real_result(seqs, *args)

    handler.result = result  # type: ignore[method-assign]
    for job_id in ids:
        driver.claim_job(job_id)
    deadline = time.monotonic() + 120
    while (len(driver.engine) or driver.to_finish) and time.monotonic() < deadline:
        driver._tick(lambda: True)
    records = {job_id: store.get(job_id) or {} for job_id in ids}
    failed = [r for r in records.values() if r.get("status") == "failed"]
    succeeded = [r for r in records.values() if r.get("status") == "succeeded"]
    assert len(failed) == len(succeeded) == 1  # the job whose result raised, and the other
    assert json.loads(failed[0]["error"])["code"] == "generation_error"
    assert calls[0].startswith(failed[0]["id"]) and succeeded[0]["text"]
    assert len(calls) == 2 and not driver.to_finish  # each result built once
