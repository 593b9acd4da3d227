"""HTTP routes. Each parses, calls the service, and picks JSON or SSE; nothing else lives here."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel

from conveyor import logs
from conveyor.contract import JobKind
from conveyor.errors import BackendUnavailable, ConveyorError, InvalidRequest, ModelNotFound
from conveyor.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    RerankRequest,
    ScoreRequest,
)
from gateway import guard
from gateway.errors import endpoint_label
from gateway.relay import CLIENT_CLOSED_REQUEST
from gateway.service import ServingService
from gateway.streaming import ClientGone, EventStream, until_disconnect

TIMEOUT_HEADER = "x-conveyor-timeout"


def service_of(request: Request) -> ServingService:
    service: ServingService = request.app.state.service
    return service


def _timeout(request: Request, ceiling: float) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= ceiling):
        raise InvalidRequest(
            f"Header {TIMEOUT_HEADER} must be a number of seconds above 0 and at most {ceiling:g}.",
            param=TIMEOUT_HEADER,
        )
    return value


async def serve(request: Request, kind: JobKind, body: BaseModel) -> Response:
    service = service_of(request)
    request.state.model = getattr(body, "model", None)
    try:
        payload: dict[str, Any] = body.model_dump(mode="json", exclude_unset=True)
    except ValueError:  # pydantic-core's "Maximum serialization depth exceeded": a body nested hundreds of levels deep
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None
    key = guard.api_key_of(request)
    envelope = service.envelope(kind, payload, _timeout(request, service.settings.request_timeout), key)
    logs.tag(envelope.request_id, envelope.model)
    headers = {"X-Request-Id": envelope.request_id}
    endpoint = endpoint_label(request)
    try:
        if envelope.stream:
            relay = await until_disconnect(request, service.open_stream(envelope, endpoint, headers))
            return EventStream(relay, headers=headers)  # the relay records its outcome when it ends
        result = await until_disconnect(request, service.complete(envelope, headers))
    except ConveyorError as exc:  # refused or failed: the key's rate-limit headers go with the error
        exc.headers = headers | exc.headers
        raise
    except ClientGone:
        gone = CLIENT_CLOSED_REQUEST
        service.metrics.observe(envelope.model, endpoint, gone, "client_closed_request", envelope.created)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    service.metrics.observe(envelope.model, endpoint, 200, None, envelope.created)
    return Response(result, media_type="application/json", headers=headers)


#: the job routes ``gateway.hot_routes`` serves without FastAPI's stack (their request model: the route's ``body``)
HOT_PATHS = {
    "/v1/chat/completions": JobKind.CHAT,
    "/v1/completions": JobKind.COMPLETION,
    "/v1/embeddings": JobKind.EMBEDDING,
}

router = APIRouter()
api = APIRouter(prefix="/v1")  # the API key is checked before parsing, by gateway.guard (and on the paths below)


#: a job route answers a stream as server-sent events
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


@api.post("/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await serve(request, JobKind.CHAT, body)


@api.post("/completions", responses=STREAMED)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await serve(request, JobKind.COMPLETION, body)


@api.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return await serve(request, JobKind.EMBEDDING, body)


# Rerank and score at every path vLLM's server has them: /v1/rerank and /v1/score, /v2/rerank (Cohere's), and
# /rerank and /score. Each is guarded like /v1/ (gateway.errors.is_api_path).


@api.post("/rerank")
@router.post("/v2/rerank")
@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> Response:
    return await serve(request, JobKind.RERANK, body)


@api.post("/score")
@router.post("/score")
async def score(body: ScoreRequest, request: Request) -> Response:
    return await serve(request, JobKind.SCORE, body)


@api.get("/models")
async def list_models(request: Request) -> ModelList:
    """The models, or those the request's API key may use."""
    return ModelList(data=[c for c in await service_of(request).models() if guard.may_use(request, c.id)])


@api.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    if not guard.may_use(request, model_id):
        raise ModelNotFound(f"The model `{model_id}` does not exist or you do not have access to it.", param="model")
    return await service_of(request).model_card(model_id)


@router.get("/")
async def root(request: Request) -> dict[str, Any]:
    """The service, its version and its endpoints (those its OpenAPI schema lists: the admin API where it is on)."""
    endpoints = [
        {"method": method, "path": route.path_format}
        for route in request.app.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in sorted(route.methods)
    ]
    return {"name": "conveyor", "version": request.app.version, "endpoints": endpoints}


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


#: /ready's report, ready or not
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"description": "Not ready: the report says why", "content": {"application/json": {}}}
}


@router.get("/ready", responses=NOT_READY)
async def ready(request: Request, scope: Literal["system", "gateway"] = "system") -> JSONResponse:
    """``system``: Redis answers and every configured model has a live worker. ``gateway``: this gateway can serve
    (Redis answers); the readiness probe of a gateway replica, which one model's outage must not fail."""
    report = await service_of(request).readiness(models=scope == "system")
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus's classic text format whatever the scraper asks (see ``worker/http_endpoints.py``); queue depth
    and live workers, and the progress of unfinished batches, are read from Redis now."""
    service = service_of(request)
    with contextlib.suppress(BackendUnavailable):  # Redis down: the gauges keep their last values
        await service.refresh_gauges()
        service.metrics.set_batch_progress(await request.app.state.batches.progress())
    return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)


router.include_router(api)
