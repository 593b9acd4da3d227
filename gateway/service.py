"""The serving service: turns a validated request into a job and its answer into a response body or an SSE stream.

Built once per app in the lifespan and kept on ``app.state.service``; routes stay thin.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from conveyor import key_layout, token_estimate
from conveyor.contract import JobEnvelope, JobKind, TenantRef
from conveyor.errors import BackendUnavailable, DeadlineExceeded, EngineFailure, RemoteError
from conveyor.fleet import FleetStore, ModelRun
from conveyor.keys import ApiKey
from conveyor.protocol import FleetState, ModelCard
from gateway.directory import ModelDirectory
from gateway.inbox import ReplyInbox
from gateway.metrics import GatewayMetrics
from gateway.pubsub import PubSubMultiplexer
from gateway.queue import JobQueue, redis_errors
from gateway.relay import FrameReader, StreamRelay
from gateway.settings import GatewaySettings

#: how often the set of models that may be metric labels is refreshed (the gauges themselves are read at each scrape)
KNOWN_MODELS_REFRESH_SECONDS = 5.0


class ServingService:
    def __init__(
        self,
        queue: JobQueue,
        directory: ModelDirectory,
        inbox: ReplyInbox,
        mux: PubSubMultiplexer,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
    ) -> None:
        self.queue = queue
        self.directory = directory
        self.inbox = inbox
        self.mux = mux
        self.settings = settings
        self.metrics = metrics
        self._background: set[asyncio.Task[None]] = set()

    def envelope(
        self, kind: JobKind, body: dict[str, Any], timeout: float | None = None, key: ApiKey | None = None
    ) -> JobEnvelope:
        """A job for ``body``; with a managed API key, accounted to it and charged its estimated tokens."""
        now = time.time()
        tenant = None
        if key is not None:
            reserved = token_estimate.charge(kind, body, self.settings.default_output_tokens)
            weight = key.weight or 1.0
            tenant = TenantRef(key_id=key.id, name=key.name, second=int(now), reserved=reserved, weight=weight)
        return JobEnvelope(
            request_id=uuid.uuid4().hex,
            reply_to=self.inbox.gateway_id,
            model=body["model"],
            kind=kind,
            body=body,
            stream=bool(body.get("stream")),
            created=now,
            deadline=now + (timeout or self.settings.request_timeout),
            tenant=tenant,
        )

    # --- non-streamed ---------------------------------------------------------------------------------------------

    async def complete(self, envelope: JobEnvelope, headers: dict[str, str]) -> bytes:
        """The engine's response JSON, untouched; the key's rate-limit headers are added to ``headers``."""
        answer = self.inbox.expect(envelope.request_id)
        try:
            headers.update(await self.queue.submit(envelope))
        except BaseException:  # refused: nothing was enqueued
            self.inbox.forget(envelope.request_id)
            raise
        try:
            async with asyncio.timeout(max(envelope.seconds_left(), 0.001)):
                reply = await answer
        except BaseException as exc:  # deadline, client gone (CancelledError): the job must not run on
            self.inbox.forget(envelope.request_id)
            self._later(self.queue.cancel(envelope))
            if isinstance(exc, TimeoutError):
                budget = envelope.deadline - envelope.created
                raise DeadlineExceeded(f"no answer within the request's deadline ({budget:.1f} s)") from None
            raise
        if reply.error is not None:
            raise RemoteError(reply.error)
        if reply.body is None:
            raise EngineFailure("the worker answered with neither a body nor an error")
        return reply.body

    # --- streamed ---------------------------------------------------------------------------------------------------

    async def open_stream(self, envelope: JobEnvelope, endpoint: str, headers: dict[str, str]) -> StreamRelay:
        """Subscribe, admit + enqueue, and wait for the first frame, so that anything that fails before the first
        token is an ordinary HTTP error. Returns the relay of the rest; the key's rate-limit headers are added to
        ``headers``."""
        channel = key_layout.stream_channel(envelope.model, envelope.request_id)
        with redis_errors():
            messages = await self.mux.subscribe(channel)
        enqueued = False
        try:
            headers.update(await self.queue.submit(envelope))
            enqueued = True
            reader = FrameReader(self.queue, envelope, messages)
            first = await reader.next()
            if first.type == "error":
                raise RemoteError(first.error_info())
        except BaseException:
            self._later(self.mux.unsubscribe(channel))
            if enqueued:
                self._later(self.queue.cancel(envelope))
            raise
        ttft = self.metrics.labelled(self.metrics.ttft, self.metrics.model_label(envelope.model))
        ttft.observe(time.time() - envelope.created)
        return StreamRelay(envelope, reader, first, self.queue, self.mux, self.metrics, endpoint)

    # --- models and readiness ----------------------------------------------------------------------------------

    async def _card(self, model: str, configured: set[str], runs: dict[str, ModelRun]) -> ModelCard | None:
        """A model's card with its state; None for a model that is neither configured nor doing anything."""
        status = await self.directory.status(model)
        if status.state == "unavailable" and model not in configured:
            return None
        run = runs.get(model)
        return ModelCard(
            fleet=FleetState(**run.model_dump(exclude={"last_log", "updated_at"})) if run else None,
            id=model,
            status=status.state,
            max_model_len=status.info.max_model_len if status.info else None,
            capabilities=status.info.capabilities if status.info else [],
            live_workers=status.live_workers,
            loading_workers=status.loading_workers,
            failure=status.failure.reason if status.failure and not status.live_workers else None,
        )

    async def _fleet(self) -> tuple[set[str], dict[str, ModelRun]]:
        with redis_errors():
            return await self.directory.configured(), await FleetStore(self.directory.redis).runs()

    async def models(self) -> list[ModelCard]:
        configured, runs = await self._fleet()
        cards = [await self._card(name, configured, runs) for name in sorted(await self.directory.names())]
        return [card for card in cards if card is not None]

    async def model_card(self, model: str) -> ModelCard:
        card = await self._card(model, *await self._fleet()) if await self.directory.is_known(model) else None
        if card is None:
            raise await self.directory.unavailable(model)
        return card

    async def readiness(self, models: bool = True) -> dict[str, Any]:
        """Ready when Redis answers and (with ``models``) at least one model is configured and every configured model
        can take requests (a live worker, or ``scaled_to_zero``: its requests wait for a worker to start). No
        configured model at all is not ready: that is also what a gateway sees while ``conveyor up`` has not written
        its fleet yet, and a system that serves nothing is not ready to serve."""
        statuses: dict[str, dict[str, Any]] = {}
        taking = True
        try:
            for model in sorted(await self.directory.configured()) if models else ():
                status = await self.directory.status(model)
                statuses[model] = {"status": status.state, "live_workers": status.live_workers}
                taking = taking and status.can_take_requests
            if not statuses:
                with redis_errors():
                    await self.directory.redis.ping()
        except BackendUnavailable:
            return {"ready": False, "redis": False, "models": statuses}
        return {"ready": not models or (bool(statuses) and taking), "redis": True, "models": statuses}

    async def refresh_known_models(self) -> set[str]:
        """The set of models that may be metric labels (a model a worker registers later gets its own series); and
        the models this gateway lets scale to zero, marked so again (``key_layout.scale_to_zero_key``)."""
        await self.directory.allow_zero(self.settings.scale_to_zero)
        self.metrics.known_models = await self.directory.names()
        return self.metrics.known_models

    async def refresh_gauges(self) -> None:
        """Queue depth and live workers of every known model, read now (at each scrape of /metrics)."""
        for model in await self.refresh_known_models():
            status = await self.directory.status(model)
            self.metrics.queue_depth.labels(model).set(status.queue_depth)
            self.metrics.live_workers.labels(model).set(status.live_workers)

    async def refresh_known_models_forever(self, interval: float = KNOWN_MODELS_REFRESH_SECONDS) -> None:
        while True:
            with contextlib.suppress(BackendUnavailable):  # /ready and the requests report Redis being down
                await self.refresh_known_models()
            await asyncio.sleep(interval)

    # --- housekeeping -------------------------------------------------------------------------------------------

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run clean-up outside the (possibly cancelled) request task."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
