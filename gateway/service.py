"""The serving service: turns a validated request into a job and its answer into a response body or an SSE stream.

Built once per app in the lifespan and kept on ``app.state.service``; routes stay thin.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from conveyor import contract, registry
from conveyor.contract import JobEnvelope, JobKind, StreamFrame
from conveyor.errors import (
    BackendUnavailable,
    ConveyorError,
    DeadlineExceeded,
    EngineFailure,
    ModelNotFound,
    NoLiveWorker,
    RemoteError,
    error_body,
)
from conveyor.protocol import ModelCard
from gateway.metrics import GatewayMetrics
from gateway.pubsub import CONNECTION_LOST, PubSubMultiplexer
from gateway.queue import JobQueue, redis_errors
from gateway.settings import GatewaySettings

DONE = b"data: [DONE]\n\n"
#: how often the queue-depth and live-worker gauges are refreshed between requests (Prometheus scrapes every ~15 s)
GAUGE_REFRESH_SECONDS = 5.0


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ServingService:
    def __init__(
        self, queue: JobQueue, mux: PubSubMultiplexer, settings: GatewaySettings, metrics: GatewayMetrics
    ) -> None:
        self.queue = queue
        self.mux = mux
        self.settings = settings
        self.metrics = metrics
        self._background: set[asyncio.Task[None]] = set()

    def envelope(self, kind: JobKind, body: dict[str, Any], timeout: float | None = None) -> JobEnvelope:
        now = time.time()
        budget = min(timeout, self.settings.request_timeout) if timeout else self.settings.request_timeout
        return JobEnvelope(
            request_id=uuid.uuid4().hex,
            model=body["model"],
            kind=kind,
            body=body,
            stream=bool(body.get("stream")),
            created=now,
            deadline=now + budget,
        )

    # --- non-streamed ---------------------------------------------------------------------------------------------

    async def complete(self, envelope: JobEnvelope) -> bytes:
        """The engine's response JSON, untouched."""
        await self.queue.submit(envelope)
        try:
            reply = await self.queue.wait_reply(envelope)
        except BaseException:  # deadline, client gone (CancelledError), Redis down: the job must not run on
            self._later(self.queue.cancel(envelope))
            raise
        if reply.error is not None:
            raise RemoteError(reply.error)
        if reply.body is None:
            raise EngineFailure("the worker answered with neither a body nor an error")
        return reply.body

    # --- streamed ---------------------------------------------------------------------------------------------------

    async def open_stream(self, envelope: JobEnvelope) -> AsyncIterator[bytes]:
        """Admit, subscribe, enqueue, and wait for the first message, so that anything that fails before the first
        token is an ordinary HTTP error. Returns the relay of the rest as SSE bytes."""
        channel = contract.stream_channel(envelope.request_id)
        with redis_errors():
            messages = await self.mux.subscribe(channel)
        try:
            await self.queue.submit(envelope)
            first = await self._next(messages, envelope)
            if first.type == "error":
                raise RemoteError(first.error_info())
        except BaseException:
            self._later(self.mux.unsubscribe(channel))
            self._later(self.queue.cancel(envelope))
            raise
        self.metrics.ttft.labels(envelope.model).observe(time.time() - envelope.created)
        return self._relay(envelope, messages, first)

    async def _relay(
        self, envelope: JobEnvelope, messages: asyncio.Queue[Any], frame: StreamFrame
    ) -> AsyncIterator[bytes]:
        finished = False
        self.metrics.open_streams.inc()
        try:
            for expected in itertools.count():
                if frame.seq != expected:
                    yield sse(
                        error_body(
                            EngineFailure(
                                f"stream corrupted: expected chunk {expected}, got {frame.seq}", code="stream_gap"
                            ).info()
                        )
                    )
                    break
                if frame.type != "chunk":
                    finished = True
                    if frame.type == "error":
                        yield sse(error_body(frame.error_info()))
                    break
                yield b"data: " + frame.payload + b"\n\n"
                frame = await self._next(messages, envelope)
            yield DONE
        except ConveyorError as exc:  # deadline or backend lost between chunks
            yield sse(exc.body())
            yield DONE
        finally:
            self.metrics.open_streams.dec()
            self._later(self.mux.unsubscribe(contract.stream_channel(envelope.request_id)))
            if not finished:
                self._later(self.queue.cancel(envelope))

    async def _next(self, messages: asyncio.Queue[Any], envelope: JobEnvelope) -> StreamFrame:
        try:
            raw = messages.get_nowait()  # the common case mid-stream, and far cheaper than a timed wait
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(max(envelope.seconds_left(), 0.001)):
                    raw = await messages.get()
            except TimeoutError:
                raise DeadlineExceeded("no answer within the request's deadline") from None
        if raw is CONNECTION_LOST:
            raise BackendUnavailable("lost the connection to the queue backend mid-stream")
        return StreamFrame.decode(raw)

    # --- models and readiness ----------------------------------------------------------------------------------

    async def _card(self, model: str) -> ModelCard | None:
        with redis_errors():
            status = await registry.model_status(self.queue.redis, model)
        if status.info is None:
            return None
        return ModelCard(
            id=model,
            max_model_len=status.info.max_model_len,
            capabilities=status.info.capabilities,
            live_workers=status.live_workers,
        )

    async def live_models(self) -> list[ModelCard]:
        with redis_errors():
            names = await self.queue.model_names()
        cards = [await self._card(name) for name in sorted(names)]
        return [card for card in cards if card is not None]

    async def model_card(self, model: str) -> ModelCard:
        card = await self._card(model)
        if card is not None:
            return card
        with redis_errors():
            known = await self.queue.is_known(model)
        if known:
            raise NoLiveWorker(f"No live worker serves `{model}` right now.", param="model")
        raise ModelNotFound(f"The model `{model}` does not exist.", param="model")

    async def readiness(self) -> dict[str, Any]:
        """Ready when Redis answers and every configured model has a live worker."""
        if not await self.queue.ping():
            return {"ready": False, "redis": False, "models": {}}
        models: dict[str, int] = {}
        for model in self.settings.models:
            try:
                with redis_errors():
                    models[model] = (await registry.model_status(self.queue.redis, model)).live_workers
            except BackendUnavailable:
                return {"ready": False, "redis": False, "models": models}
        ready = all(count > 0 for count in models.values())
        return {"ready": ready, "redis": True, "models": {m: {"live_workers": n} for m, n in models.items()}}

    async def refresh_gauges(self) -> None:
        """Queue depth and live workers of every known model, so dashboards stay current while no request arrives."""
        with redis_errors():
            for model in await self.queue.model_names():
                status = await registry.model_status(self.queue.redis, model)
                self.metrics.queue_depth.labels(model).set(status.queue_depth)
                self.metrics.live_workers.labels(model).set(status.live_workers)

    async def refresh_gauges_forever(self, interval: float = GAUGE_REFRESH_SECONDS) -> None:
        while True:
            with contextlib.suppress(BackendUnavailable):  # /ready and the requests report Redis being down
                await self.refresh_gauges()
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
