"""Which models this deployment knows and what state each is in, read from the worker registry."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

from redis.asyncio import Redis

from conveyor import key_layout, registry
from conveyor.errors import ConveyorError, ModelNotFound, NoLiveWorker
from conveyor.fleet import FleetStore
from gateway.queue import redis_errors
from gateway.settings import GatewaySettings


class ModelDirectory:
    def __init__(self, redis: Redis, settings: GatewaySettings) -> None:
        self.redis = redis
        self.settings = settings

    async def configured(self) -> set[str]:
        """The models this deployment expects: ``CONVEYOR_GATEWAY_MODELS``, and the fleet ``conveyor up`` runs."""
        with redis_errors():
            fleet = await cast(Awaitable[list[bytes]], self.redis.hkeys(key_layout.FLEET_MODELS))
        return set(self.settings.models) | set(self.settings.scale_to_zero) | {name.decode() for name in fleet}

    async def allow_zero(self, models: list[str]) -> None:
        """Mark ``models`` as ones whose requests wait for a worker to start (capabilities unknown here: ``[]``),
        except a model whose engine failed recently (``registry.FAILURE_TTL_SECONDS``): its requests get 503
        ``model_failed`` at once instead of waiting out their deadline for a worker that keeps failing."""
        if not models:
            return
        with redis_errors():
            # One GET per model, not MGET: each model's failure key is in its model's slot, and a Redis Cluster
            # refuses an MGET across slots; a pipeline without a transaction sends each GET to its node.
            async with self.redis.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.get(key_layout.model_failure_key(model))
                failures = await pipe.execute()
            async with self.redis.pipeline(transaction=False) as pipe:
                for model, failure in zip(models, failures, strict=True):
                    if failure is None:
                        pipe.set(key_layout.scale_to_zero_key(model), "[]", ex=key_layout.SCALE_TO_ZERO_TTL_SECONDS)
                    else:
                        pipe.delete(key_layout.scale_to_zero_key(model))
                await pipe.execute()

    async def names(self) -> set[str]:
        """Every model this deployment knows: configured, or served by a worker at some time (until it is removed
        from the fleet)."""
        with redis_errors():
            served = await registry.known_models(self.redis)
        return served | await self.configured()

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
        with redis_errors():
            run = (await FleetStore(self.redis).runs()).get(model)
        if run is not None and run.state == "failed" and not status.live_workers:
            return NoLiveWorker(f"`{model}` failed: {run.message}.", param="model", code="model_failed")
        if status.state == "failed" and status.failure is not None:
            return NoLiveWorker(
                f"`{model}` has no live worker: its last worker stopped ({status.failure.reason}).",
                param="model",
                code="model_failed",
            )
        return NoLiveWorker(
            f"No live worker serves `{model}` right now; try again when one has started.", param="model"
        )
