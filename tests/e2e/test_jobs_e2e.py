"""The job path end to end: HTTP → Redis → Celery worker (prefork, one child) → demo model → poll."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from qwen_deploy.client import APIError, Client
from qwen_deploy.job_records import new_job_id
from tests.helpers import ROOT, Stack, wait_until

LONG = {"prompt": "Beautiful is better than", "max_new_tokens": 512, "ignore_eos": True}


def poll(client: Client, job_id: str, timeout: float = 60.0) -> dict:
    return wait_until(
        lambda: (j := client.get(job_id))["status"] in ("succeeded", "failed", "canceled", "timed_out") and j,
        timeout,
        0.02,
        "a terminal job",
    )


def test_zen_by_polling(client: Client) -> None:
    job = client.submit("Beautiful is better than", max_new_tokens=8)
    assert job["status"] == "queued" and job["id"].startswith("job_")
    done = poll(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["output"]["text"].startswith(" ugly.")
    assert done["output"]["finish_reason"] == "length"
    assert done["output"]["usage"] == {
        "prompt_tokens": done["output"]["usage"]["prompt_tokens"],
        "completion_tokens": 8,
        "prompt_truncated": False,
        "prompt_tokens_details": {"cached_tokens": done["output"]["usage"]["prompt_tokens_details"]["cached_tokens"]},
    }
    assert done["progress"] == {"tokens": 8, "max_new_tokens": 8}
    assert done["created_at"] <= done["started_at"] <= done["completed_at"]


def test_zen_by_long_poll(client: Client) -> None:
    job = client.submit("Errors should never", max_new_tokens=6)
    done = client.get(job["id"], wait=20)
    assert done["status"] == "succeeded"
    assert done["output"]["text"].startswith(" pass silently.")


def test_zen_by_sse(client: Client) -> None:
    job = client.submit("Beautiful is better than", max_new_tokens=40)
    events = list(client.stream(job["id"]))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and "status" in kinds
    final = events[-1][1]
    assert final["status"] == "succeeded"
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert final["output"]["text"].startswith(" ugly.")
    assert final["output"]["text"].startswith(streamed)


def test_sync_generate(client: Client) -> None:
    job = client.generate("Errors should never", max_new_tokens=6)
    assert job["status"] == "succeeded"
    assert job["output"]["text"].startswith(" pass silently.")


def test_chat_messages_use_the_template(client: Client) -> None:
    job = client.submit(messages=[{"role": "user", "content": "Beautiful is better than"}])
    done = client.wait(job["id"])
    assert done["output"]["text"] == "ugly."
    assert done["output"]["finish_reason"] == "eos"


def test_stop_string_cuts_the_text(client: Client) -> None:
    done = client.generate("Beautiful is better than", max_new_tokens=64, stop=["better"])
    assert done["output"]["text"] == " ugly.\nExplicit is "
    assert done["output"]["finish_reason"] == "stop"


def test_cap_of_512_new_tokens(client: Client) -> None:
    job = client.submit("Beautiful is better than", max_new_tokens=512, ignore_eos=True)
    assert job["progress"]["max_new_tokens"] == 512
    with pytest.raises(APIError) as err:
        client.submit("Beautiful is better than", max_new_tokens=513)
    assert (err.value.status, err.value.code, err.value.param) == (422, "max_new_tokens_too_large", "max_new_tokens")
    done = client.wait(job["id"])
    assert done["status"] == "succeeded"
    assert done["output"]["finish_reason"] == "length"
    assert done["output"]["usage"]["completion_tokens"] == 512


def test_default_is_64_new_tokens(client: Client) -> None:
    done = client.generate("Beautiful is better than", ignore_eos=True)
    assert done["output"]["usage"]["completion_tokens"] == 64
    assert done["progress"]["max_new_tokens"] == 64


def test_long_prompt_keeps_its_last_2048_tokens(client: Client) -> None:
    prompt = "Simple is better than complex. " * 600 + "Beautiful is better than"
    done = client.generate(prompt, max_new_tokens=4)
    usage = done["output"]["usage"]
    assert done["status"] == "succeeded"
    assert usage["prompt_tokens"] == 2048 and usage["prompt_truncated"] is True


def test_unknown_id_is_404_and_expired_is_410(client: Client) -> None:
    with pytest.raises(APIError) as err:
        client.get(new_job_id())
    assert (err.value.status, err.value.code) == (404, "not_found")
    old = "job_" + f"{int((time.time() - 2 * 86400) * 1000):012x}" + "0" * 16
    with pytest.raises(APIError) as err:
        client.get(old)
    assert (err.value.status, err.value.code) == (410, "expired")
    with pytest.raises(APIError) as err:
        client.get("nonsense")
    assert err.value.status == 404


def test_idempotency_key_returns_the_same_job(client: Client) -> None:
    first = client.submit("Errors should never", max_new_tokens=3, idempotency_key="same-key-1")
    again = client.submit("Errors should never", max_new_tokens=3, idempotency_key="same-key-1")
    assert again["id"] == first["id"]
    assert client.wait(first["id"])["status"] == "succeeded"


def test_cancel_running_job_keeps_partial_text(stack: Stack, client: Client) -> None:
    pid = stack.child_pid()
    job = client.submit(**LONG)
    wait_until(lambda: client.get(job["id"])["progress"]["tokens"] > 0, 30, 0.01, "tokens")
    answer = client.cancel(job["id"])
    assert answer["status"] in ("canceling", "canceled")
    done = client.wait(job["id"], timeout=10)
    assert done["status"] == "canceled"
    assert done["output"]["finish_reason"] == "canceled"
    assert done["output"]["text"].startswith(" ugly.")
    assert 0 < done["output"]["usage"]["completion_tokens"] < 512
    assert done["completed_at"] - answer.get("started_at", done["started_at"]) < 30
    assert stack.child_pid() == pid
    with pytest.raises(APIError) as err:
        client.cancel(job["id"])
    assert (err.value.status, err.value.code) == (409, "job_finished")


def test_cancel_right_after_submit_ends_canceled(stack: Stack, client: Client) -> None:
    """Queued (never runs) or already claimed by the busy engine (stops with its partial text): either
    way the job ends canceled and the worker goes on (tests/store/test_store.py covers the queued case)."""
    busy = client.submit(**LONG)
    queued = client.submit("Errors should never", max_new_tokens=400, ignore_eos=True)
    answer = client.cancel(queued["id"])
    assert answer["status"] in ("canceled", "canceling")
    client.cancel(busy["id"])
    assert client.wait(busy["id"])["status"] == "canceled"
    done = client.wait(queued["id"])
    assert done["status"] == "canceled"
    assert done["output"] is None or len(done["output"]["text"]) < len(
        client.generate("Errors should never", max_new_tokens=400, ignore_eos=True)["output"]["text"]
    )
    after = client.generate("Errors should never", max_new_tokens=4)
    assert after["status"] == "succeeded"
    if answer["status"] == "canceled":
        assert stack.record(queued["id"])["deliveries"] == "0"


def test_model_loaded_once_across_50_jobs(stack: Stack, client: Client) -> None:
    loads, pid = stack.model_loads(), stack.child_pid()
    ids = [client.submit("Errors should never", max_new_tokens=4)["id"] for _ in range(50)]
    texts = [client.wait(i)["output"]["text"] for i in ids]
    assert all(t.startswith(" pass") for t in texts)
    assert stack.model_loads() == loads == 1
    assert stack.child_pid() == pid


def test_model_route_and_readiness(stack: Stack, client: Client) -> None:
    info = client.model()
    assert info["name"] == str(stack.settings.model.name_or_path)
    from worker.device import cpu_has_native_bf16  # model.dtype auto: bf16 on a CPU with native bf16

    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert info["device"] == "cpu" and info["dtype"] == dtype and info["parameters"] > 0
    assert info["caps"]["max_new_tokens"] == 512
    assert requests.get(stack.url + "/readyz", timeout=5).json()["status"] == "ready"
    assert requests.get(stack.url + "/livez", timeout=5).status_code == 200


def test_web_app_imports_no_torch(stack: Stack) -> None:
    code = (
        "import sys; from web import create_app; create_app(); "
        "heavy = [m for m in ('torch', 'transformers', 'celery') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=stack.env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "[]"


def _raw_post(url: str, head: bytes, body: bytes, close_write: bool = False) -> bytes:
    """POST /v1/jobs over a plain socket (what requests would not send); the whole answer."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + head + b"\r\n" + body)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_chunked_and_cut_short_bodies_through_gunicorn(stack: Stack) -> None:
    body = b'{"prompt": "Beautiful is better than", "max_new_tokens": 2}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = _raw_post(stack.url, b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    head = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % (len(body) + 40)
    answer = _raw_post(stack.url, head, body, close_write=True)  # 40 bytes never come
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert requests.get(stack.url + "/livez", timeout=10).status_code == 200


def test_a_stored_request_with_an_unknown_field_fails_its_job(stack: Stack, client: Client) -> None:
    """The suite's workers read stored requests strictly: a record another writer filled with a field the
    request type lacks ends failed invalid_request, naming the field (production logs it and runs the job)."""
    import json

    from qwen_deploy.connections import job_store
    from qwen_deploy.queues import GENERATE_TASK, Lane, task_message

    store, job_id, queue = job_store(stack.settings), new_job_id(), Lane.INTERACTIVE.queue
    request = {"prompt": "Errors should never", "max_new_tokens": 4, "best_of": 2}
    fields = {"type": "generation", "request": json.dumps(request), "created_at": repr(time.time())}
    message = task_message(GENERATE_TASK, job_id, queue, [job_id])
    assert store.submit(job_id, queue, message, fields, 100, engine=True).status == "ok"
    job = poll(client, job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "invalid_request"), job
    assert job["error"]["message"] == "the stored request has unknown fields: best_of"
    assert client.generate("Errors should never", max_new_tokens=4)["output"]["text"].startswith(" pass")
