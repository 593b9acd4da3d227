"""The SSE relay of one job's frames: what a client's socket is sent, write by write."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from conveyor.contract import ErrorInfo, JobEnvelope, JobKind, StreamFrame
from gateway.metrics import GatewayMetrics
from gateway.pubsub import PubSubMultiplexer
from gateway.queue import JobQueue
from gateway.relay import DONE, FrameReader, StreamRelay


def relay_of(messages: asyncio.Queue[Any], first: StreamFrame) -> StreamRelay:
    envelope = JobEnvelope(request_id="r", model="m", kind=JobKind.CHAT, body={}, deadline=time.time() + 30)
    queue = cast(JobQueue, None)  # never asked: every frame is there before it is read
    reader = FrameReader(queue, envelope, messages)
    return StreamRelay(envelope, reader, first, queue, cast(PubSubMultiplexer, None), GatewayMetrics(), "chat")


def chunk(seq: int) -> StreamFrame:
    return StreamFrame.chunk(seq, {"n": seq})


async def writes(relay: StreamRelay, messages: asyncio.Queue[Any], later: list[StreamFrame]) -> list[bytes]:
    """What the relay hands its response, write by write; ``later`` arrives once the first write is taken."""
    out = []
    async for data in relay:
        out.append(data)
        for frame in later:
            messages.put_nowait(frame.encode())
        later = []
    return out


async def test_frames_that_arrived_together_go_in_one_write_each_its_own_event() -> None:
    messages: asyncio.Queue[Any] = asyncio.Queue()
    for frame in (chunk(1), chunk(2)):
        messages.put_nowait(frame.encode())
    relay = relay_of(messages, chunk(0))
    sent = await writes(relay, messages, [chunk(3), StreamFrame(4, "end")])
    assert sent == [
        b'data: {"n":0}\n\ndata: {"n":1}\n\ndata: {"n":2}\n\n',
        b'data: {"n":3}\n\n' + DONE,  # the end had arrived with it
    ]
    assert relay.status == 200


async def test_an_error_after_frames_that_arrived_together_follows_them_in_the_same_write() -> None:
    messages: asyncio.Queue[Any] = asyncio.Queue()
    failure = StreamFrame.failure(
        2, ErrorInfo(status=500, message="engine died", type="server_error", code="engine_error")
    )
    for frame in (chunk(1), failure):
        messages.put_nowait(frame.encode())
    relay = relay_of(messages, chunk(0))
    (sent,) = await writes(relay, messages, [])
    events = sent.split(b"\n\n")
    assert events[:2] == [b'data: {"n":0}', b'data: {"n":1}'] and b"engine died" in events[2]
    assert sent.endswith(DONE) and relay.status == 500
