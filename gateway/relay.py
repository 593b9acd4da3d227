"""Relaying one job's stream frames to its client as SSE, and noticing when the worker behind it is lost.

Frames carry sequence numbers from 0. A stream whose worker is lost mid-way is continued by the next worker where it
was cut (``worker.migration``), numbering its frames on, so the relay waits while the job is queued again or running,
up to the request's deadline; a job that cannot be continued gets a ``worker_lost`` error event from the worker that
finds it. While no frame arrives the relay checks the job's lease every ``LEASE_CHECK_SECONDS``: a job gone from the
queue without its end frame (cancelled elsewhere, its data expired), or a stream started again from its first chunk
(a worker of an older version), ends with ``worker_lost`` at once instead of silence.

``aclose`` always cleans up, even when the client left before the relay sent a byte (an async generator that never
started would skip its ``finally``): it unsubscribes, cancels the job unless it ended, and records the stream's
outcome and its duration to the last byte.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from conveyor import key_layout
from conveyor.contract import JobEnvelope, StreamFrame
from conveyor.errors import (
    BackendUnavailable,
    ConveyorError,
    DeadlineExceeded,
    EngineFailure,
    RemoteError,
    WorkerLost,
)
from gateway.metrics import GatewayMetrics
from gateway.pubsub import CONNECTION_LOST, PubSubMultiplexer
from gateway.queue import JobQueue, JobState

DONE = b"data: [DONE]\n\n"
#: how long a stream may be silent before its job's lease is checked
LEASE_CHECK_SECONDS = 2.0
#: a job gone from the queue may still have frames in flight: wait this long for them before calling it lost
GONE_GRACE_SECONDS = 0.5
CLIENT_CLOSED_REQUEST = 499


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class FrameReader:
    """The frames of one job's channel, in order, with the deadline and lost-worker checks."""

    def __init__(self, queue: JobQueue, envelope: JobEnvelope, messages: asyncio.Queue[Any]) -> None:
        self.queue = queue
        self.envelope = envelope
        self.messages = messages
        #: chunks passed on to the client so far
        self.relayed = 0

    async def next(self) -> StreamFrame:
        try:
            raw = self.messages.get_nowait()  # the common case mid-stream, and far cheaper than a timed wait
        except asyncio.QueueEmpty:
            raw = await self._wait()
        return self._frame(raw)

    def ready(self) -> StreamFrame | None:
        """The next frame if it has arrived already, else None."""
        return None if self.messages.empty() else self._frame(self.messages.get_nowait())

    def _frame(self, raw: Any) -> StreamFrame:
        if raw is CONNECTION_LOST:
            raise BackendUnavailable("Lost the connection to the queue backend mid-stream.")
        frame = StreamFrame.decode(raw)
        if frame.seq == 0 and self.relayed and frame.type == "chunk":
            raise self._lost()  # another worker restarted the job from its beginning
        return frame

    async def _wait(self) -> Any:
        while True:
            left = self.envelope.seconds_left()
            if left <= 0:
                raise DeadlineExceeded("no answer within the request's deadline")
            try:
                async with asyncio.timeout(min(left, LEASE_CHECK_SECONDS)):
                    return await self.messages.get()
            except TimeoutError:
                pass
            if await self.queue.state(self.envelope) is not JobState.GONE:
                continue  # running, or waiting for a worker (which goes on where the stream was cut)
            try:
                async with asyncio.timeout(GONE_GRACE_SECONDS):
                    return await self.messages.get()
            except TimeoutError:
                raise self._lost() from None

    def _lost(self) -> WorkerLost:
        return WorkerLost(
            f"The worker serving this stream was lost after {self.relayed} chunks; the stream cannot be resumed."
        )


class StreamRelay:
    def __init__(
        self,
        envelope: JobEnvelope,
        reader: FrameReader,
        first: StreamFrame,
        queue: JobQueue,
        mux: PubSubMultiplexer,
        metrics: GatewayMetrics,
        endpoint: str,
    ) -> None:
        self.envelope = envelope
        self.reader = reader
        self.queue = queue
        self.mux = mux
        self.metrics = metrics
        self.endpoint = endpoint
        self.status = CLIENT_CLOSED_REQUEST  # until the stream ends some other way
        self.reason: str | None = "client_closed_request"
        self._closed = False
        self._events = self._relay(first)
        metrics.open_streams.inc()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events

    async def _relay(self, frame: StreamFrame) -> AsyncIterator[bytes]:
        """The stream's events. Frames that have arrived together (a worker sends a job's ready frames in one go) are
        written together: one write to the client's socket for them, each still its own event."""
        events = b""  # not written yet
        try:
            while True:
                if frame.seq != self.reader.relayed:
                    raise EngineFailure(
                        f"stream corrupted: expected chunk {self.reader.relayed}, got {frame.seq}", code="stream_gap"
                    )
                if frame.type == "end":
                    self._end(200, None)
                    break
                if frame.type == "error":
                    raise RemoteError(frame.error_info())
                events += b"data: " + frame.payload + b"\n\n"
                self.reader.relayed += 1
                ready = self.reader.ready()
                if ready is None:
                    yield events
                    events = b""
                    ready = await self.reader.next()
                frame = ready
        except ConveyorError as exc:  # failed mid-stream: an error event, then the end of the stream
            self._end(exc.status, exc.code or exc.type)
            events += sse(exc.body())
        yield events + DONE

    def _end(self, status: int, reason: str | None) -> None:
        self.status, self.reason = status, reason

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._events.aclose()  # type: ignore[attr-defined]
        self.metrics.open_streams.dec()
        self.metrics.observe(self.envelope.model, self.endpoint, self.status, self.reason, self.envelope.created)
        await self.mux.unsubscribe(key_layout.stream_channel(self.envelope.model, self.envelope.request_id))
        if self.status != 200:  # it did not end with its end frame: the job must not run on
            await self.queue.cancel(self.envelope)
