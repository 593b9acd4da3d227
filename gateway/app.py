"""The gateway application: the lifespan owns every client; routes and error mapping are plugged in here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from arq.connections import ArqRedis
from fastapi import FastAPI

from conveyor import redis_client
from gateway import errors
from gateway.metrics import GatewayMetrics
from gateway.pubsub import PubSubMultiplexer
from gateway.queue import JobQueue
from gateway.routes import router
from gateway.service import ServingService
from gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings, connect: Callable[[str], ArqRedis] = redis_client.connect) -> FastAPI:
    """``connect`` builds the Redis client in the lifespan (tests pass one backed by fakeredis)."""
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        mux = PubSubMultiplexer(redis)
        service = ServingService(JobQueue(redis, settings, metrics), mux, settings, metrics)
        app.state.service = service
        await mux.start()
        gauges = asyncio.create_task(service.refresh_gauges_forever(), name="gauge-refresh")
        try:
            yield
        finally:
            gauges.cancel()
            await service.drain()
            await mux.stop()
            await redis_client.close(redis)

    app = FastAPI(title="Conveyor", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    errors.install(app)
    app.include_router(router)
    return app
