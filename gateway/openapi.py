"""The OpenAPI document, told as the gateway answers: every refusal is OpenAI's error object, never FastAPI's.

FastAPI documents a 422 with its own validation error for every route that takes input; the gateway answers bad input
400 with OpenAI's error object (``gateway.errors``), and any route may also answer 401, 404, 413, 429, 503 or 504 with
it. So each operation's 422 gives way to a ``default`` response: OpenAI's error object, whatever the status. What a
route answers on success (a stream, plain text, bytes) is said on the route itself.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

#: the component every error response refers to (``conveyor.errors.error_body``)
ERROR_SCHEMA = "ErrorResponse"
_FASTAPI_ONLY = ("HTTPValidationError", "ValidationError")
_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_DEFAULT = {
    "description": "Refused or failed: OpenAI's error object (400 bad input, 401, 404, 413, 429, 503, 504, ...)",
    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}},
}


def install(app: FastAPI) -> None:
    """Serve ``app``'s OpenAPI document with OpenAI-shaped errors (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_openai_errors(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def with_openai_errors(document: dict[str, Any]) -> dict[str, Any]:
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["default"] = _DEFAULT
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_ONLY:
        schemas.pop(name, None)
    schemas[ERROR_SCHEMA] = _ERROR
    return document
