"""Which models this deployment knows and what state each is in, read from the worker registry."""

from __future__ import annotations

from redis.asyncio import Redis

from conveyor import registry
from conveyor.errors import ConveyorError, ModelNotFound, NoLiveWorker
from gateway.queue import redis_errors
from gateway.settings import GatewaySettings


class ModelDirectory:
    def __init__(self, redis: Redis, settings: GatewaySettings) -> None:
        self.redis = redis
        self.settings = settings

    async def names(self) -> set[str]:
        """Every model this deployment knows: configured, or served by a worker at some time."""
        with redis_errors():
            return await registry.known_models(self.redis) | set(self.settings.models)

    async def is_known(self, model: str) -> bool:
        """A known model without a live worker is 503; anything else is 404."""
        return model in self.settings.models or model in await self.names()

    async def status(self, model: str) -> registry.ModelStatus:
        with redis_errors():
            return await registry.model_status(self.redis, model)

    async def unavailable(self, model: str) -> ConveyorError:
        """Why ``model`` cannot take a request now: 404 if nobody knows it, else a 503 saying what it is doing."""
        if not await self.is_known(model):
            return ModelNotFound(f"The model `{model}` does not exist.", param="model")
        status = await self.status(model)
        if status.state == "loading":
            return NoLiveWorker(
                f"`{model}` is loading ({status.loading_workers} worker(s) starting); retry shortly.",
                param="model",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        if status.state == "failed" and status.failure is not None:
            return NoLiveWorker(
                f"`{model}` has no live worker: its last worker stopped ({status.failure.reason}).",
                param="model",
                code="model_failed",
            )
        return NoLiveWorker(
            f"No live worker serves `{model}` right now; try again when one has started.", param="model"
        )
