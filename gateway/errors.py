"""The one mapping from exceptions to OpenAI-shaped error responses, and the metrics every refusal records."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from conveyor import logs
from conveyor.errors import ConveyorError, InvalidRequest, NotFound, PayloadTooLarge, RateLimited, error_body
from gateway.metrics import OTHER

log = logging.getLogger("conveyor.gateway")
#: FastAPI's detail when reading the body raised anything but a JSON syntax error
FASTAPI_PARSE_FAILURE = "There was an error parsing the body"
#: what pydantic puts before the message of a ValueError a validator raised
PYDANTIC_VALUE_ERROR = "Value error, "
#: the client API: every path under these prefixes, and these paths outside them (vLLM's rerank and score paths)
API_PREFIXES = ("/v1/", "/v2/")
API_PATHS = frozenset({"/rerank", "/score"})


def is_api_path(path: str) -> bool:
    """A path of the client API: it needs an API key (``gateway.guard``) and its refusals are counted as requests."""
    return path.startswith(API_PREFIXES) or path.rstrip("/") in API_PATHS


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if param is None and isinstance(first.get("input"), bytes):  # FastAPI read the body as bytes: not sent as JSON
        message = "The request body must be JSON, sent with the header Content-Type: application/json."
        return InvalidRequest(message, code="invalid_content_type")
    message = str(first.get("msg", "invalid request")).removeprefix(PYDANTIC_VALUE_ERROR)
    if first.get("type") == "missing" and param is None:  # no body at all
        message = "The request has no body: send a JSON object, with the header Content-Type: application/json."
        return InvalidRequest(message, code="missing_body")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param)


def endpoint_label(request: Request) -> str:
    """The matched route's template (bounded); every unmatched path shares one value."""
    route = request.scope.get("route")
    return str(getattr(route, "path", OTHER))


def respond(request: Request, error: ConveyorError) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and is_api_path(request.url.path):
        arrived = getattr(request.state, "arrived", time.time())
        model = getattr(request.state, "model", None)
        metrics.observe(model, endpoint_label(request), error.status, error.code or error.type, arrived)
        key = getattr(request.state, "api_key", None)
        if isinstance(error, RateLimited) and key is not None:
            metrics.key_refusals.labels(key.name, error.type).inc()
    request_id = logs.current_request()  # known once the request became a job: the same id as in the logs
    headers = error.headers | ({"X-Request-Id": request_id} if request_id else {})
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def as_error(request: Request, exc: Exception) -> ConveyorError | None:
    """The OpenAI-shaped error the app answers ``exc`` with: its own errors, FastAPI's validation errors and
    starlette's HTTP exceptions; None for anything unexpected (answered 500 ``internal_error`` and logged)."""
    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if not isinstance(exc, StarletteHTTPException):
        return None
    if exc.status_code == 404:
        return NotFound(f"No route {request.method} {request.url.path}.")
    if exc.status_code == 413:
        return PayloadTooLarge(str(exc.detail))
    if exc.status_code == 400 and exc.detail == FASTAPI_PARSE_FAILURE:  # e.g. nested past the JSON parser's depth
        message = "The request body could not be parsed as JSON (malformed, or nested too deeply)."
        return InvalidRequest(message, code="invalid_json")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # RFC 9110 requires Allow; starlette names only the first route on the path's methods
        headers["Allow"] = ", ".join(_methods_at(request))
    error = InvalidRequest(str(exc.detail), code=f"http_{exc.status_code}", headers=headers)
    error.status = exc.status_code
    return error


def _methods_at(request: Request) -> list[str]:
    """Every method some route of the app takes at the request's path."""
    at_path = [route for route in request.app.routes if route.matches(request.scope)[0] != Match.NONE]
    return sorted({method for route in at_path for method in getattr(route, "methods", None) or ()})


def install(app: FastAPI) -> None:
    async def _expected(request: Request, exc: Exception) -> JSONResponse:
        error = as_error(request, exc)
        assert error is not None  # registered below for exactly the classes as_error maps
        return respond(request, error)

    for expected in (ConveyorError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(expected, _expected)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return respond(request, ConveyorError("The server failed on this request.", code="internal_error"))


__all__ = ["as_error", "error_body", "install", "is_api_path", "respond", "validation_error"]
