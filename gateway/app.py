"""The gateway application: the lifespan owns every client; routes, the request guard and error mapping are plugged
in here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis

from conveyor import VERSION, gc_tuning, redis_client
from conveyor.filestore import open_store
from conveyor.key_renames import rename_old_keys
from conveyor.keys import KeyStore
from conveyor.netaddr import address_towards, host_port
from conveyor.outage import REDIS_DOWN, Outage
from gateway import errors, openapi, rate_limits
from gateway.admin_routes import admin
from gateway.batch_driver import BatchDriver
from gateway.batch_store import BatchStore
from gateway.batches import BatchService
from gateway.bulk_routes import bulk
from gateway.directory import ModelDirectory
from gateway.files import FileService
from gateway.guard import RequestGuard
from gateway.hot_routes import HotRoutes
from gateway.inbox import ReplyInbox
from gateway.key_cache import KeyCache
from gateway.metrics import GatewayMetrics
from gateway.pubsub import PubSubMultiplexer
from gateway.queue_backends import open_queue
from gateway.routes import router
from gateway.scrape_targets import advertise, advertise_forever, leave, targets
from gateway.service import ServingService
from gateway.settings import GatewaySettings
from gateway.sweeper import Sweeper

log = logging.getLogger("conveyor.gateway")


def create_app(settings: GatewaySettings, connect: Callable[[str], Redis] = redis_client.connect) -> FastAPI:
    """``connect`` builds the Redis client in the lifespan (tests pass one backed by fakeredis)."""
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        with contextlib.suppress(*REDIS_DOWN):  # Redis down now: nothing it holds can be read before it is back
            await rename_old_keys(redis)
        outage = Outage(log, "gateway")
        directory = ModelDirectory(redis, settings)
        inbox = ReplyInbox(redis, outage)
        mux = PubSubMultiplexer(redis)
        queue = open_queue(redis, settings, directory)
        service = ServingService(queue, directory, inbox, mux, settings, metrics)
        app.state.service = service
        app.state.keys = KeyStore(redis)
        app.state.key_cache = KeyCache(app.state.keys, settings.key_cache_seconds)
        store = open_store(settings.files_url)
        batch_store = BatchStore(redis)
        app.state.files = FileService(store, batch_store, directory, settings.min_expiry_seconds)
        app.state.batches = BatchService(batch_store, settings)
        driver = BatchDriver(batch_store, app.state.files, store, queue, directory, settings, outage)
        app.state.batches.wake = driver.wake
        sweeper = Sweeper(batch_store, store, settings, outage)
        inbox.start()
        await mux.start()
        app.state.redis = redis
        address = host_port(settings.advertise_host or address_towards(settings.redis_url), settings.port)
        await advertise(redis, address)  # scrapable from the start
        background = [
            asyncio.create_task(service.refresh_known_models_forever(), name="known-models"),
            asyncio.create_task(advertise_forever(redis, address), name="advertise"),
            asyncio.create_task(driver.run_forever(), name="batch-driver"),
            asyncio.create_task(sweeper.run_forever(), name="sweeper"),
        ]
        gc_tuning.settle()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await leave(redis, address)
            await service.drain()
            await mux.stop()
            await inbox.stop()
            await redis_client.close(redis)

    # the API docs describe every route: with keys set they are not served to whoever asks
    docs = {} if not settings.api_keys else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Conveyor", version=VERSION, lifespan=lifespan, **docs)  # type: ignore[arg-type]
    app.state.metrics = metrics
    errors.install(app)
    openapi.install(app)
    app.include_router(router)
    app.include_router(bulk)
    app.include_router(targets)
    app.include_router(admin, include_in_schema=settings.admin_key is not None)  # /docs: only where it exists
    app.add_middleware(HotRoutes, app_routes=app.router.routes)  # inside the guard: keys and body limits apply
    app.add_middleware(RequestGuard, settings=settings)
    if settings.cors_origins:  # outermost: preflights and refusals (a 401, a 429) carry the CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["*"],
            expose_headers=["X-Request-Id", *rate_limits.HEADERS],
            max_age=600,
        )
    return app
