"""The Redis scripts batches rely on (on fakeredis) and the chunk runner's merged engine calls (on the fake engine)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.batch_lines import BatchObject
from conveyor.contract import ChunkRef, JobEnvelope, JobKind
from conveyor.errors import ConveyorError, EngineFailure
from conveyor.filestore import LocalFileStore
from gateway.batch_store import BatchStore
from worker.bulk import BULK_PRIORITY, ChunkRunner
from worker.engine_share import BUSY_INPUTS, EngineShare
from worker.engines.fake import FakeEngine


def batch(batch_id: str = "batch_1") -> BatchObject:
    now = int(time.time())
    return BatchObject(
        id=batch_id,
        endpoint="/v1/embeddings",
        input_file_id="file-1",
        completion_window="24h",
        status="validating",
        created_at=now,
        expires_at=now + 60,
        model="m",
    )


async def test_status_moves_only_from_the_allowed_statuses(redis: Redis) -> None:
    store = BatchStore(redis)
    await store.create_batch(batch())
    assert await store.move("batch_1", ("validating",), "cancelling")
    assert not await store.move("batch_1", ("validating",), "in_progress")  # a cancel came first: the driver loses
    got = await store.batch("batch_1")
    assert got.status == "cancelling" and got.cancelling_at is not None and got.in_progress_at is None


async def test_each_chunk_report_counts_once(redis: Redis) -> None:
    store = BatchStore(redis)
    await store.create_batch(batch())
    done_list = key_layout.batch_done_key("batch_1")
    await redis.rpush(done_list, b"0 60 4", b"1 64 0", b"0 60 4")  # chunk 0 ran twice (a worker lost mid-chunk)
    assert await store.fold_reports("batch_1") == {0, 1}
    await redis.rpush(done_list, b"1 64 0")
    assert await store.fold_reports("batch_1") == {0, 1}
    counts = (await store.batch("batch_1")).request_counts
    assert (counts.completed, counts.failed) == (124, 4)


async def test_one_driver_holds_a_batch_at_a_time(redis: Redis) -> None:
    store = BatchStore(redis)
    assert await store.take_lease("batch_1", "a", 10)
    assert not await store.take_lease("batch_1", "b", 10)
    assert await store.take_lease("batch_1", "a", 10)  # the holder renews
    await store.drop_lease("batch_1", "b")  # not b's to drop
    assert not await store.take_lease("batch_1", "b", 10)
    await store.drop_lease("batch_1", "a")
    assert await store.take_lease("batch_1", "b", 10)


def never_dead(_request_id: str, exc: Exception) -> ConveyorError:
    return exc if isinstance(exc, ConveyorError) else EngineFailure(str(exc))


async def run_chunk(
    tmp_path: Path,
    bodies: list[dict[str, Any]],
    engine: FakeEngine | None = None,
    share: EngineShare | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run one chunk of ``bodies``; its output lines, and the bodies of the engine calls it made."""
    store = LocalFileStore(tmp_path)
    raw = b"".join(
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": b}).encode() + b"\n"
        for i, b in enumerate(bodies)
    )
    await store.write("in.jsonl", _one(raw))
    engine = engine or FakeEngine("m", embed=True)
    calls: list[dict[str, Any]] = []
    original = engine.run

    async def counting(kind: JobKind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        calls.append(body)
        return await original(kind, body, request_id)

    engine.run = counting  # type: ignore[method-assign]
    chunk = ChunkRef(
        batch_id="b", index=0, input_file="in.jsonl", start=0, end=len(raw), first_line=0, lines=len(bodies),
        expires_at=time.time() + 60,
    )  # fmt: skip
    envelope = JobEnvelope(request_id="b-0", model="m", kind=JobKind.EMBEDDING, body={}, deadline=time.time() + 60)
    runner = ChunkRunner(engine, store, never_dead, "m", share or EngineShare(BUSY_INPUTS))
    done = await runner.run(envelope, chunk)
    assert done.delivery is not None and done.delivery.payload.startswith(f"0 {len(bodies)} 0 ".encode())
    out = [json.loads(x) async for x in _lines(store, "batches/b/0.out.jsonl")]
    return out, calls


async def _one(data: bytes) -> Any:
    yield data


async def _lines(store: LocalFileStore, name: str) -> Any:
    data = b"".join([b async for b in store.read(name)])
    for line in data.splitlines():
        yield line


@pytest.mark.parametrize("inputs", [["one two", "three", ["four five", "six"]]])
async def test_a_chunks_embedding_lines_are_one_engine_call_split_exactly(tmp_path: Path, inputs: list[Any]) -> None:
    bodies = [{"model": "m", "input": x} for x in inputs]
    out, calls = await run_chunk(tmp_path, bodies)
    assert len(calls) == 1
    alone = FakeEngine("m", embed=True)
    for line, body in zip(out, bodies, strict=True):
        expected = await alone.run(JobKind.EMBEDDING, body, "x")
        got = line["response"]["body"]
        assert got["data"] == expected["data"] and got["usage"] == expected["usage"]


async def test_lines_with_different_parameters_are_not_merged(tmp_path: Path) -> None:
    bodies = [
        {"model": "m", "input": "a b"},
        {"model": "m", "input": "c", "dimensions": 8},
        {"model": "m", "input": "d"},
    ]
    out, calls = await run_chunk(tmp_path, bodies)
    assert len(calls) == 2
    assert len(out[1]["response"]["body"]["data"][0]["embedding"]) == 8


class PriorityEngine(FakeEngine):
    def schedules_by_priority(self) -> bool:
        return True


async def test_batch_lines_run_behind_interactive_ones_where_the_engine_schedules_by_priority(tmp_path: Path) -> None:
    bodies = [{"model": "m", "input": "a"}, {"model": "m", "input": "b"}]
    _, calls = await run_chunk(tmp_path, bodies, PriorityEngine("m", embed=True))
    assert [c.get("priority") for c in calls] == [BULK_PRIORITY]
    _, calls = await run_chunk(tmp_path, bodies)
    assert [c.get("priority") for c in calls] == [None]  # an engine without priorities would refuse the field


async def test_after_interactive_requests_batch_lines_hold_a_small_share_of_the_engine(tmp_path: Path) -> None:
    share = EngineShare(busy_inputs=4)
    async with share.interactive():
        pass  # one ran just now
    bodies = [{"model": "m", "input": f"text {i}"} for i in range(10)]
    out, calls = await run_chunk(tmp_path, bodies, share=share)
    assert [len(c["input"]) for c in calls] == [2, 2, 2, 2, 2]  # calls of half the share
    alone = FakeEngine("m", embed=True)
    for line, body in zip(out, bodies, strict=True):  # split back exactly, as in one call
        assert line["response"]["body"]["data"] == (await alone.run(JobKind.EMBEDDING, body, "x"))["data"]


async def test_without_interactive_traffic_a_chunk_is_one_engine_call(tmp_path: Path) -> None:
    _, calls = await run_chunk(tmp_path, [{"model": "m", "input": f"text {i}"} for i in range(10)])
    assert [len(c["input"]) for c in calls] == [10]


async def test_no_batch_call_enters_the_engine_while_an_interactive_request_runs() -> None:
    share, entered = EngineShare(busy_inputs=4), asyncio.Event()

    async def batch_call() -> None:
        async with share.hold(1):
            entered.set()

    async with share.interactive():
        call = asyncio.create_task(batch_call())
        await asyncio.sleep(0)  # one turn of the loop: the call starts and finds an interactive request running
        assert not entered.is_set()
    await call
    assert entered.is_set()


async def test_after_interactive_traffic_a_second_batch_call_waits_for_room() -> None:
    share = EngineShare(busy_inputs=4)
    async with share.interactive():
        pass
    first_in, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def call(name: str, inputs: int, hold_until: asyncio.Event | None = None) -> None:
        async with share.hold(inputs):
            order.append(name)
            first_in.set()
            if hold_until is not None:
                await hold_until.wait()

    first = asyncio.create_task(call("first", 3, release))
    await first_in.wait()
    second = asyncio.create_task(call("second", 2))
    await asyncio.sleep(0)  # one turn of the loop: the second call starts and finds no room
    assert order == ["first"]  # 3 + 2 > 4: it waits
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]


async def test_a_share_without_interactive_traffic_has_room_for_anything() -> None:
    share = EngineShare(busy_inputs=1)
    async with share.hold(100), share.hold(100):
        assert not share.busy()
