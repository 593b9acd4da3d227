"""``gateway.streaming.until_disconnect``: the work's answer while the client stays, ``ClientGone`` (after the work
has cleaned up) when it leaves, and any other cancellation passed on."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request
from starlette.types import Message

from gateway.streaming import ClientGone, until_disconnect


def request_whose_client(leaves: asyncio.Event) -> Request:
    """A request whose body was read; ``receive`` then answers the disconnect once ``leaves`` is set."""

    async def receive() -> Message:
        await leaves.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


async def test_the_answer_comes_back_while_the_client_stays() -> None:
    async def work() -> str:
        await asyncio.sleep(0)
        return "answer"

    assert await until_disconnect(request_whose_client(asyncio.Event()), work()) == "answer"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # the request's task goes on awaiting: nothing cancels it later


async def test_a_client_that_leaves_cancels_the_work_which_cleans_up_first() -> None:
    leaves, cleaned = asyncio.Event(), asyncio.Event()
    started = asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # an answer that never comes
        except asyncio.CancelledError:
            cleaned.set()
            raise
        return "never"

    async def leave_once_started() -> None:
        await started.wait()
        leaves.set()

    leaving = asyncio.create_task(leave_once_started())
    with pytest.raises(ClientGone):
        await until_disconnect(request_whose_client(leaves), work())
    await leaving
    assert cleaned.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # the request's task may await again (to count the 499)


async def test_a_cancel_from_elsewhere_is_passed_on() -> None:
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.Event().wait()

    serving = asyncio.create_task(until_disconnect(request_whose_client(asyncio.Event()), work()))
    await started.wait()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
