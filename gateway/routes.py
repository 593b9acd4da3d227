"""HTTP routes. Each parses, calls the service, and picks JSON or SSE; nothing else lives here."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from conveyor.contract import JobKind
from conveyor.errors import InvalidRequest, Unauthorized
from conveyor.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelCard, ModelList
from gateway.service import ServingService
from gateway.streaming import ClientGone, EventStream, until_disconnect

TIMEOUT_HEADER = "x-conveyor-timeout"
CLIENT_CLOSED_REQUEST = 499


def service_of(request: Request) -> ServingService:
    service: ServingService = request.app.state.service
    return service


async def require_api_key(request: Request) -> None:
    keys = service_of(request).settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token not in keys:
        raise Unauthorized("Incorrect API key provided.")


def _timeout(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise InvalidRequest(f"header {TIMEOUT_HEADER} must be a positive number of seconds", param=TIMEOUT_HEADER)
    return value


async def _serve(request: Request, kind: JobKind, body: BaseModel) -> Response:
    service = service_of(request)
    payload: dict[str, Any] = body.model_dump(mode="json", exclude_unset=True)
    request.state.model = payload["model"]
    envelope = service.envelope(kind, payload, _timeout(request))
    headers = {"X-Request-Id": envelope.request_id}
    endpoint = request.url.path
    try:
        if envelope.stream:
            relay = await until_disconnect(request, service.open_stream(envelope))
            response: Response = EventStream(relay, headers=headers)  # type: ignore[arg-type]
        else:
            result = await until_disconnect(request, service.complete(envelope))
            response = Response(result, media_type="application/json", headers=headers)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    service.metrics.requests.labels(envelope.model, endpoint, "200").inc()
    service.metrics.duration.labels(envelope.model, endpoint).observe(time.time() - envelope.created)
    return response


router = APIRouter()
api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@api.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _serve(request, JobKind.CHAT, body)


@api.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _serve(request, JobKind.COMPLETION, body)


@api.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return await _serve(request, JobKind.EMBEDDING, body)


@api.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=await service_of(request).live_models())


@api.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return await service_of(request).model_card(model_id)


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    report = await service_of(request).readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    registry = service_of(request).metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(api)
