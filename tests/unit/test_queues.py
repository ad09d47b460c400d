"""The Celery message a submit pushes is the one Celery itself would send (task protocol 2, JSON)."""

from __future__ import annotations

import base64
import json

import pytest
from celery import Celery

from qwen_deploy.job_records import new_job_id
from qwen_deploy.queues import GENERATE_TASK, Lane, task_message

INTERACTIVE_QUEUE = Lane.INTERACTIVE.queue


@pytest.mark.parametrize("kind", ["job", "micro-batch"])
def test_the_message_matches_celerys_own(kind: str) -> None:
    """A job's message (its id) and a micro-batch's (batch id, first and last line)."""
    job_id = new_job_id()
    args: list[object] = [job_id] if kind == "job" else [new_job_id().replace("job_", "batch_"), 0, 8]
    ours = json.loads(task_message(GENERATE_TASK, job_id, INTERACTIVE_QUEUE, list(args), 60.0, 55.0))
    celery = Celery("reference", set_as_current=False)
    theirs = celery.amqp.as_task_v2(  # the app sets task_ignore_result: its messages say so
        job_id, GENERATE_TASK, args=list(args), time_limit=60.0, soft_time_limit=55.0, ignore_result=True
    )
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(json.dumps(theirs.body))
    # every header we send is one Celery sends, with the same value (`origin` names the sending process); the
    # ones we leave out are Celery 5.3's stamping and replace bookkeeping, read with these defaults when absent
    left_out = {"replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
    assert set(ours["headers"]) == set(theirs.headers) - set(left_out), set(ours["headers"]) ^ set(theirs.headers)
    assert len(ours["headers"]) == 16
    for name in set(ours["headers"]) - {"origin"}:
        assert ours["headers"][name] == json.loads(json.dumps(theirs.headers[name])), name
    assert isinstance(ours["headers"]["origin"], str) and ours["headers"]["origin"]
    assert {name: theirs.headers[name] for name in left_out} == left_out
    assert ours["properties"]["correlation_id"] == job_id
    assert ours["properties"]["delivery_info"]["routing_key"] == INTERACTIVE_QUEUE
