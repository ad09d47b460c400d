"""A small typed HTTP client for the API (used by the CLI; see examples/ for usage)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import requests

from qwen_deploy.states import JOB_TERMINAL

TERMINAL = JOB_TERMINAL


class APIError(Exception):
    """An error answer from the API, with its status and error object."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(status, error)
        self.status = status
        self.code = error.get("code")
        self.param = error.get("param")
        self.message = error.get("message", "")

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class Client:
    """Submit, wait for, stream and cancel jobs."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 90.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.timeout = timeout
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:200]}
            raise APIError(response.status_code, error)
        return response

    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        body = {"prompt": prompt, "messages": messages, **params}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        payload = {k: v for k, v in body.items() if v is not None}
        return self._call("POST", "/v1/jobs", json=payload, headers=headers).json()

    def get(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        params = {"wait": wait} if wait is not None else None
        return self._call("GET", f"/v1/jobs/{job_id}", params=params).json()

    def wait(self, job_id: str, timeout: float = 120.0, poll: float = 25.0) -> dict[str, Any]:
        """Long-poll until the job is terminal or `timeout` passes."""
        deadline = time.monotonic() + timeout
        job = self.get(job_id)
        while job["status"] not in TERMINAL and time.monotonic() < deadline:
            try:
                job = self.get(job_id, wait=round(max(0.0, min(poll, deadline - time.monotonic())), 3))
            except APIError as exc:
                if exc.param != "wait" or poll <= 1:
                    raise
                poll = 1.0  # the server allows shorter waits (limits.max_wait)
        return job

    def stream(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-sent events of a job: ("token", {...}), ("status", {...}) and finally ("done", job).

        A stream the server closes before `done` (it caps stream length) is resumed with Last-Event-ID.
        """
        last_id: str | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            with self._call("GET", f"/v1/jobs/{job_id}/events", stream=True, headers=headers) as response:
                data: list[str]
                event, data = "message", []
                for line in response.iter_lines(decode_unicode=True):
                    if line == "":
                        if data and event != "timeout":
                            yield event, json.loads("\n".join(data))
                            if event == "done":
                                return
                        event, data = "message", []
                    elif line.startswith("event:"):
                        event = line.removeprefix("event:").strip()
                    elif line.startswith("data:"):
                        data.append(line.removeprefix("data:").strip())
                    elif line.startswith("id:"):
                        last_id = line.removeprefix("id:").strip()

    def list_jobs(self, status: str | None = None, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """GET /v1/jobs: the caller's jobs, newest first (one page)."""
        params = {k: v for k, v in {"status": status, "limit": limit, "after": after}.items() if v is not None}
        return self._call("GET", "/v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def generate(self, prompt: str | None = None, **params: Any) -> dict[str, Any]:
        """Submit and wait in one call (POST /v1/generate)."""
        body = {k: v for k, v in {"prompt": prompt, **params}.items() if v is not None}
        return self._call("POST", "/v1/generate", json=body).json()

    def create_batch(self, lines: list[dict[str, Any]], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /v1/batches with `{"custom_id", "body"}` (or OpenAI Batch) lines."""
        requests_ = [{"custom_id": line["custom_id"], "body": line["body"]} for line in lines]
        return self._call("POST", "/v1/batches", json={"requests": requests_, "metadata": metadata}).json()

    def create_batch_jsonl(self, data: bytes) -> dict[str, Any]:
        """POST /v1/batches with a JSONL body as is (`{"custom_id", "body"}` or OpenAI Batch lines)."""
        return self._call("POST", "/v1/batches", data=data, headers={"Content-Type": "application/x-ndjson"}).json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/batches/{batch_id}").json()

    def batch_results(self, batch_id: str, after: int = 0) -> list[dict[str, Any]]:
        """Finished lines after the first `after` ones."""
        text = self._call("GET", f"/v1/batches/{batch_id}/results", params={"after": after}).text
        return [json.loads(line) for line in text.splitlines() if line]

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/batches/{batch_id}/cancel").json()

    def submit_model_job(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/models/downloads or /v1/models/exports (kind "download" or "export")."""
        return self._call("POST", f"/v1/models/{kind}s", json=body).json()

    def load_adapter(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/load_lora_adapter ({"lora_name", "lora_path"}; admin key)."""
        return self._call("POST", "/v1/load_lora_adapter", json=body).json()

    def register_model(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/register_model ({"model_name", "model_path"}; admin key)."""
        return self._call("POST", "/v1/register_model", json=body).json()

    def served(self, name: str) -> dict[str, Any] | None:
        """GET /v1/models/{name}: the model or adapter `name` selects, None when it selects none."""
        try:
            return self._call("GET", f"/v1/models/{name}").json()
        except APIError as exc:
            if exc.status == 404:
                return None
            raise

    def model(self) -> dict[str, Any]:
        return self._call("GET", "/v1/model").json()

    def ready(self) -> bool:
        try:
            self._call("GET", "/readyz")
            return True
        except (APIError, requests.RequestException):
            return False
