"""Every error leaves as `{"error": {type, code, message, param}}`, mapped here and only here."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from qwen_deploy.connections import UNAVAILABLE
from qwen_deploy.errors import (
    AppError,
    InternalError,
    QueueFull,
    RedisOutOfMemory,
    RedisUnavailable,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
)
from qwen_deploy.jobs import SubmitResult
from web.context import current_services

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


REJECTIONS_COUNTED = frozenset({400, 401, 413, 415, 422, 429})


def refused(result: SubmitResult, queue: str, model: str | None, retry_after: int | None) -> AppError | None:
    """The error for a submit that SUBMIT refused (None when it was accepted or replayed)."""
    if result.status == "full":
        wait = retry_after or max(1, result.depth // 50)
        return QueueFull(
            f"the {queue} queue holds {result.depth} jobs; try again later", headers={"Retry-After": str(wait)}
        )
    if result.status == "unavailable":
        return ServiceUnavailable(
            f"no worker serves the model {model!r} now and {result.depth} jobs wait for it; "
            "try again later (GET /readyz?model=... says why)",
            code="model_unavailable",
            param="model",
            headers={"Retry-After": str(retry_after or 10)},
        )
    if result.status == "inflight":
        return TooManyRequests(
            f"this key has {result.depth} jobs queued or running; wait for some to finish",
            code="too_many_inflight",
            headers={"Retry-After": str(retry_after or 1)},
        )
    if result.status == "reused":
        return Unprocessable(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    return None


def _count_rejection(status: int) -> None:
    """Rejected requests per status, for /metrics (best effort: Redis may be the reason we fail)."""
    if status not in REJECTIONS_COUNTED:
        return
    try:
        svc = current_services()
        svc.redis.hincrby(svc.store.stats_key(), f"rejected:{status}", 1)
    except redis.RedisError:
        pass


def _respond(err: AppError) -> Response:
    _count_rejection(err.status_code)
    response = jsonify(err.to_dict())
    response.status_code = err.status_code
    response.headers.update(err.headers)
    return response


def register(app: Flask) -> None:
    app.register_error_handler(AppError, _respond)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is larger than {request.max_content_length} bytes"
        err = AppError(message, code=_HTTP_CODES.get(status, exc.name.lower().replace(" ", "_")), status_code=status)
        response = _respond(err)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    def _redis_down(exc: Exception) -> Response:
        log.warning("redis unavailable: %s", exc)
        return _respond(
            RedisUnavailable("the job store (Redis) is unreachable; try again shortly", headers={"Retry-After": "5"})
        )

    for unavailable in UNAVAILABLE:  # no writable master: Redis restarting, or a Sentinel failover under way
        app.register_error_handler(unavailable, _redis_down)

    @app.errorhandler(redis.exceptions.ResponseError)
    def _redis_refused(exc: redis.exceptions.ResponseError) -> Response:
        oom = isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(exc)
        if not oom:
            return _unexpected(exc)
        log.warning("redis is out of memory: %s", exc)
        return _respond(
            RedisOutOfMemory("the job store (Redis) is full; try again later", headers={"Retry-After": "30"})
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return _respond(InternalError("internal error"))
