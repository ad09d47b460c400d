"""OpenAI's side of batches that the batch routes share: the lines of an input file, their one endpoint,
stored results presented as that endpoint's objects, and a batch's virtual output and error files."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qwen_deploy.batches import BATCH_ID_PREFIX, ERROR_FILE, OUTPUT_FILE
from qwen_deploy.config import Settings
from qwen_deploy.errors import BadRequest, NotFound, Unprocessable
from qwen_deploy.job_records import valid_id
from qwen_deploy.requests import GenerationRequest
from qwen_deploy.served import find_model
from web.batch_lines import jsonl_lines, parse_lines
from web.context import current_services
from web.job_options import parse_duration
from web.openai_api.embed import EMBEDDINGS, embedding_list, embedding_request
from web.openai_api.objects import chat_completion, text_completion
from web.openai_api.translate import CHAT, COMPLETIONS, JOBS, job_request, model_id, unsupported
from web.schemas import check_task
from web.services.files import file_store
from web.services.records import owns
from web.services.stores import batch_store

ENDPOINTS = (JOBS, CHAT, COMPLETIONS, EMBEDDINGS)
PRESENT = {CHAT: chat_completion, COMPLETIONS: text_completion, EMBEDDINGS: embedding_list}
KEYS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata"})


def line_endpoint(items: list[tuple[int, Any]]) -> str:
    """The one endpoint a JSONL batch's lines target (lines naming another become error lines)."""
    urls = {
        item.get("url", JOBS) for _, item in items if isinstance(item, dict) and isinstance(item.get("url", JOBS), str)
    } & set(ENDPOINTS)
    if len(urls) > 1:
        raise Unprocessable(
            f"a batch targets one endpoint; its lines name {', '.join(sorted(urls))}",
            code="mixed_endpoints",
            param="url",
        )
    return urls.pop() if urls else JOBS


def line_request(url: str, body: Any, settings: Settings) -> GenerationRequest:
    """The job request of a batch line sent to `url`, on a model whose task takes it (400 `wrong_model_task`)."""
    if url != EMBEDDINGS:
        req = job_request(url, body, settings)
        served = find_model(settings, req.model)
        if served is not None:
            check_task(served, req)
        return req
    return embedding_request(body, settings)


def file_lines(body: dict[str, Any]) -> tuple[list[tuple[int, Any]], Any, dict[str, str]]:
    """OpenAI's `{input_file_id, endpoint, completion_window, metadata}`: the lines of the uploaded file."""
    for key in body:
        if key not in KEYS:
            raise unsupported(key)
    endpoint, window, metadata = body.get("endpoint"), body.get("completion_window", "24h"), body.get("metadata")
    if endpoint not in ENDPOINTS:
        raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}", code="invalid_value", param="endpoint")
    if not isinstance(window, str):
        raise BadRequest(
            "completion_window must be a duration like 24h", code="invalid_type", param="completion_window"
        )
    parse_duration(window, "completion_window")  # 24h, or a shorter window
    if metadata is not None and (
        not isinstance(metadata, dict) or len(metadata) > 16 or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise BadRequest("metadata must map at most 16 keys to strings", code="invalid_value", param="metadata")
    file_id = body["input_file_id"]
    content = file_store().content(file_id) if isinstance(file_id, str) else None
    if content is None:
        raise NotFound(f"no file with id {file_id}", param="input_file_id")
    limits = current_services().settings.batches  # every limit checked before a line is parsed
    lines = jsonl_lines(content.encode(), limits.max_lines, limits.max_line_bytes, limits.max_bytes)
    return parse_lines(lines), metadata, {"endpoint": endpoint, "input_file_id": file_id, "completion_window": window}


def present_lines(lines: list[str], record: dict[str, str]) -> list[str]:
    """Stored output lines with `response.body` as the endpoint's own object (chat.completion, text_completion)."""
    present = PRESENT.get(record.get("endpoint") or JOBS)
    if present is None:
        return lines
    model, out = record.get("model") or model_id(current_services().settings), []
    for raw in lines:
        line = json.loads(raw)
        body = (line.get("response") or {}).get("body")
        if body and body.get("object") == "generation":
            job = {
                "id": line["id"],
                "created_at": record.get("completed_at") or record.get("created_at"),
                "output": body.get("output"),
            }
            line["response"]["body"] = present(job, model)
            line["response"]["request_id"] = line["id"]
        out.append(json.dumps(line))
    return out


def virtual_file(file_id: str) -> tuple[dict[str, Any], Callable[[], str]] | None:
    """A batch's output (lines without an error) or error file (lines with one), or None for another id."""
    for prefix, purpose, keep in ((OUTPUT_FILE, "output", False), (ERROR_FILE, "errors", True)):  # noqa: B007
        if file_id.startswith(prefix):
            break
    else:
        return None
    batch_id = BATCH_ID_PREFIX + file_id.removeprefix(prefix)
    record = batch_store().get(batch_id) if valid_id(batch_id, BATCH_ID_PREFIX) else None
    if record is None or "id" not in record or not owns(record):  # another key's: 404
        raise NotFound(f"no file with id {file_id}", param="file_id")
    lines = [
        line
        for line in present_lines(batch_store().results(batch_id, 0), record)
        if (json.loads(line).get("error") is not None) == keep
    ]
    content = "".join(line + "\n" for line in lines)
    obj = {
        "id": file_id,
        "object": "file",
        "bytes": len(content.encode()),
        "created_at": int(float(record.get("completed_at") or record["created_at"])),
        "expires_at": None,
        "filename": f"{batch_id}_{purpose}.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "status_details": None,
    }
    return obj, lambda: content
