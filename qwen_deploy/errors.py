"""One error hierarchy for the whole service, mapped to JSON in one place (web/errors.py)."""

from __future__ import annotations


class AppError(Exception):
    """An error with an HTTP status, a stable code and the request field it concerns."""

    status_code = 400
    type = "invalid_request_error"
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code, param, status_code, headers)
        self.message = message
        self.code = code or self.code
        self.param = param
        self.status_code = status_code or self.status_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, object]:
        return {"error": {"type": self.type, "code": self.code, "message": self.message, "param": self.param}}


class BadRequest(AppError):
    status_code, code = 400, "bad_request"


class Unauthorized(AppError):
    status_code, code, type = 401, "invalid_api_key", "authentication_error"


class Forbidden(AppError):
    status_code, code, type = 403, "forbidden", "permission_error"


class NotFound(AppError):
    status_code, code, type = 404, "not_found", "not_found_error"


class Gone(AppError):
    status_code, code, type = 410, "expired", "not_found_error"


class Conflict(AppError):
    status_code, code = 409, "conflict"


class PayloadTooLarge(AppError):
    status_code, code = 413, "body_too_large"


class UnsupportedMediaType(AppError):
    status_code, code = 415, "unsupported_media_type"


class Unprocessable(AppError):
    status_code, code = 422, "invalid_value"


class QueueFull(AppError):
    status_code, code, type = 429, "queue_full", "rate_limit_error"


class TooManyRequests(AppError):
    status_code, code, type = 429, "rate_limited", "rate_limit_error"


class QuotaExceeded(AppError):
    status_code, code, type = 429, "quota_exceeded", "rate_limit_error"


class ServiceUnavailable(AppError):
    status_code, code, type = 503, "service_unavailable", "server_error"


class RedisUnavailable(ServiceUnavailable):
    code = "redis_unavailable"  # no writable master: Redis restarting, or a Sentinel failover under way


class RedisOutOfMemory(ServiceUnavailable):
    code = "redis_out_of_memory"


class InternalError(AppError):
    status_code, code, type = 500, "internal_error", "server_error"


class GatewayTimeout(AppError):
    status_code, code, type = 504, "generation_timeout", "server_error"


class ModelNotFound(AppError):
    status_code, code, type = 404, "model_not_found", "invalid_request_error"
