"""One exception tree for every error a client can see, each knowing its HTTP status and OpenAI error type."""

from __future__ import annotations

from typing import Any

from conveyor.contract import ErrorInfo


class ConveyorError(Exception):
    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def info(self) -> ErrorInfo:
        return ErrorInfo(status=self.status, message=self.message, type=self.type, code=self.code, param=self.param)

    def body(self) -> dict[str, Any]:
        return error_body(self.info())


class InvalidRequest(ConveyorError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(ConveyorError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class Unauthorized(ConveyorError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFound(ConveyorError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class NotFound(ConveyorError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(ConveyorError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class RateLimited(ConveyorError):
    """Over one of an API key's limits. ``type`` names the limit as OpenAI does (``requests``, ``tokens``)."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.type = limit


class Overloaded(ConveyorError):
    status = 429
    type = "rate_limit_error"
    default_code = "queue_full"


class EngineFailure(ConveyorError):
    status = 500
    type = "server_error"
    default_code = "engine_error"


class NoLiveWorker(ConveyorError):
    status = 503
    type = "service_unavailable"
    default_code = "no_live_worker"


class WorkerLost(ConveyorError):
    """The worker running a request was lost (killed, its engine died) and the request cannot be resumed or retried."""

    status = 503
    type = "service_unavailable"
    default_code = "worker_lost"


class BackendUnavailable(ConveyorError):
    status = 503
    type = "service_unavailable"
    default_code = "redis_unavailable"


class DeadlineExceeded(ConveyorError):
    status = 504
    type = "timeout_error"
    default_code = "deadline_exceeded"


class RemoteError(ConveyorError):
    """An error reported by the other side of the queue (a worker), carried with the status it chose."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message, param=info.param, code=info.code)
        self.status = info.status
        self.type = info.type


def error_body(info: ErrorInfo) -> dict[str, Any]:
    return {"error": {"message": info.message, "type": info.type, "param": info.param, "code": info.code}}
