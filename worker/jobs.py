"""The job function: take one envelope off the queue, run it on the engine, answer through Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from conveyor import contract
from conveyor.contract import JobEnvelope, Reply, StreamFrame
from conveyor.errors import ConveyorError, DeadlineExceeded, EngineFailure, InvalidRequest
from worker import metrics
from worker.engines.base import Engine
from worker.publisher import BatchPublisher

log = logging.getLogger("conveyor.worker")

#: how long an unread reply may sit in Redis (the gateway reads it within milliseconds or has gone)
REPLY_TTL_SECONDS = 60


class JobRunner:
    """Runs envelopes on the engine. Every accepted job is answered: a result, an error, or (cancelled) nothing
    because the client is gone. A job cancelled by shutdown is re-raised so arq hands it back to the queue."""

    def __init__(self, redis: Redis, engine: Engine, model: str) -> None:
        self.redis = redis
        self.engine = engine
        self.model = model
        self.publisher = BatchPublisher(redis)

    async def job(self, ctx: dict[str, Any], raw: dict[str, Any]) -> None:
        """arq job function (registered under ``contract.JOB_FUNCTION``)."""
        try:
            envelope = JobEnvelope.model_validate(raw)
        except ValidationError as exc:
            log.error("refusing a malformed job envelope: %s", exc)
            request_id, stream = raw.get("request_id"), bool(raw.get("stream"))
            if isinstance(request_id, str):
                await self._deliver_error(request_id, stream, InvalidRequest("malformed job envelope"))
            return
        if envelope.v != contract.ENVELOPE_VERSION:
            error = EngineFailure(
                f"job envelope v{envelope.v} is not understood by this worker (v{contract.ENVELOPE_VERSION})",
                code="envelope_version",
            )
            await self._deliver_error(envelope.request_id, envelope.stream, error)
            return
        await self.run(envelope)

    async def run(self, envelope: JobEnvelope) -> None:
        kind = envelope.kind.value
        started = time.time()
        metrics.QUEUE_WAIT.labels(self.model).observe(max(0.0, started - envelope.created))
        left = envelope.seconds_left(started)
        if left <= 0:
            metrics.JOBS.labels(self.model, kind, "expired").inc()
            error = DeadlineExceeded("the request's deadline passed before a worker could start it")
            await self._deliver_error(envelope.request_id, envelope.stream, error)
            return
        metrics.RUNNING_JOBS.labels(self.model).inc()
        outcome = "cancelled"
        try:
            outcome = await (self._stream(envelope, left) if envelope.stream else self._complete(envelope, left))
        finally:
            metrics.RUNNING_JOBS.labels(self.model).dec()
            metrics.JOBS.labels(self.model, kind, outcome).inc()
            metrics.JOB_DURATION.labels(self.model, kind).observe(time.time() - started)

    async def _complete(self, envelope: JobEnvelope, left: float) -> str:
        try:
            async with asyncio.timeout(left):
                body = await self.engine.run(envelope.kind, envelope.body, envelope.request_id)
        except Exception as exc:  # CancelledError is not an Exception: it propagates
            error = self._client_error(envelope, exc)
            await self._reply(envelope.request_id, Reply(error=error.info()))
            return _outcome(error)
        await self._reply(envelope.request_id, Reply(body=contract.json_bytes(body)))
        return "ok"

    async def _stream(self, envelope: JobEnvelope, left: float) -> str:
        channel = contract.stream_channel(envelope.request_id)
        seq = 0
        try:
            async with asyncio.timeout(left):
                async for chunk in self.engine.stream(envelope.kind, envelope.body, envelope.request_id):
                    await self._publish(channel, StreamFrame.chunk(seq, chunk))
                    seq += 1
        except Exception as exc:
            error = self._client_error(envelope, exc)
            await self._publish(channel, StreamFrame.failure(seq, error.info()))
            return _outcome(error)
        await self._publish(channel, StreamFrame(seq, "end"))
        return "ok"

    def _client_error(self, envelope: JobEnvelope, exc: Exception) -> ConveyorError:
        if isinstance(exc, ConveyorError):
            return exc
        if isinstance(exc, TimeoutError):
            return DeadlineExceeded("the request's deadline passed while it ran")
        log.exception("job %s failed in the engine", envelope.request_id, exc_info=exc)
        return EngineFailure(f"the engine failed: {type(exc).__name__}: {exc}")

    async def _deliver_error(self, request_id: str, stream: bool, error: ConveyorError) -> None:
        if stream:
            await self._publish(contract.stream_channel(request_id), StreamFrame.failure(0, error.info()))
        else:
            await self._reply(request_id, Reply(error=error.info()))

    async def _publish(self, channel: str, frame: StreamFrame) -> None:
        await self.publisher.publish(channel, frame.encode())
        metrics.STREAM_MESSAGES.labels(self.model).inc()

    async def _reply(self, request_id: str, reply: Reply) -> None:
        key = contract.reply_key(request_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, reply.encode())
            pipe.expire(key, REPLY_TTL_SECONDS)
            await pipe.execute()


def _outcome(error: ConveyorError) -> str:
    return "expired" if isinstance(error, DeadlineExceeded) else "error"
