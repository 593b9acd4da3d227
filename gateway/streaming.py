"""Client disconnects, noticed at once for both kinds of response, so the job is cancelled right away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.relay import StreamRelay

T = TypeVar("T")


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (which cancels the job), wait until it has
    cleaned up, and raise ``ClientGone``. ``work`` runs in the request's own task, which a watcher of the client
    cancels when it leaves: no task of its own and no ``asyncio.wait`` per request."""
    request_task = asyncio.current_task()
    assert request_task is not None
    awaiting, gone = True, False

    def on_watcher_done(watcher: asyncio.Future[None]) -> None:
        nonlocal gone
        if watcher.cancelled():
            return
        watcher.exception()  # a watcher that failed reading is a client gone too
        if awaiting:
            gone = True
            request_task.cancel()

    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    watcher.add_done_callback(on_watcher_done)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        request_task.uncancel()
        raise ClientGone() from None
    finally:
        awaiting = False
        watcher.cancel()


class EventStream(StreamingResponse):
    """SSE response that listens for the disconnect itself (whatever the server's ASGI version) and closes the
    relay at once, so its clean-up cancels the job even while no token is flowing, and even before the first byte."""

    media_type = "text/event-stream"

    def __init__(self, relay: StreamRelay, headers: dict[str, str] | None = None) -> None:
        super().__init__(relay, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await _wait_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self._relay.aclose()
