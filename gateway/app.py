"""The gateway application: the lifespan owns every client; routes, the request guard and error mapping are plugged
in here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from conveyor import redis_client
from conveyor.outage import Outage
from gateway import errors
from gateway.arq_queue import ArqJobQueue
from gateway.directory import ModelDirectory
from gateway.guard import RequestGuard
from gateway.inbox import ReplyInbox
from gateway.metrics import GatewayMetrics
from gateway.pubsub import PubSubMultiplexer
from gateway.routes import router
from gateway.service import ServingService
from gateway.settings import GatewaySettings

log = logging.getLogger("conveyor.gateway")


def create_app(settings: GatewaySettings, connect: Callable[[str], Redis] = redis_client.connect) -> FastAPI:
    """``connect`` builds the Redis client in the lifespan (tests pass one backed by fakeredis)."""
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        outage = Outage(log, "gateway")
        directory = ModelDirectory(redis, settings)
        inbox = ReplyInbox(redis, outage)
        mux = PubSubMultiplexer(redis)
        queue = ArqJobQueue(redis, settings, metrics, directory)
        service = ServingService(queue, directory, inbox, mux, settings, metrics)
        app.state.service = service
        inbox.start()
        await mux.start()
        gauges = asyncio.create_task(service.refresh_gauges_forever(), name="gauge-refresh")
        try:
            yield
        finally:
            gauges.cancel()
            await service.drain()
            await mux.stop()
            await inbox.stop()
            await redis_client.close(redis)

    # the API docs describe every route: with keys set they are not served to whoever asks
    docs = {} if not settings.api_keys else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Conveyor", version="0.1.0", lifespan=lifespan, **docs)  # type: ignore[arg-type]
    app.state.metrics = metrics
    errors.install(app)
    app.include_router(router)
    app.add_middleware(RequestGuard, settings=settings)
    return app
