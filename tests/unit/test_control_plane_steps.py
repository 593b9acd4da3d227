"""The control plane's multi-key changes without transactions (issue 19: Redis Cluster refuses MULTI/EXEC): scripts
where the keys share a slot, ordered steps where they cannot (forgetting a model), on fakeredis."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor import key_layout, registry
from conveyor.batch_lines import BatchObject, FileObject, StoredFile
from conveyor.errors import InvalidRequest
from conveyor.fleet import FleetStore, ModelRun, ModelSpec
from conveyor.keys import KeyCreate, KeyStore, KeyUpdate
from gateway.batch_store import BatchStore


def worker(worker_id: str, model: str, state: registry.WorkerState = "serving") -> registry.WorkerInfo:
    return registry.WorkerInfo(
        worker_id=worker_id, model=model, state=state, capabilities=["embed"], max_jobs=1, host="h", pid=1, started=0
    )


async def beat(redis: Redis, worker_id: str, model: str) -> None:
    info = worker(worker_id, model)
    await registry.heartbeat(redis, info, ttl=30)
    await registry.deregister(redis, info, registry.Failure(worker_id=worker_id, reason="engine_dead", at=0))
    await registry.heartbeat(redis, info, ttl=30)  # back: a card, a failure and a live worker


async def test_forgetting_a_model_leaves_nothing_of_it_and_touches_no_other(redis: Redis) -> None:
    await beat(redis, "w1", "a")
    await beat(redis, "w2", "b")
    await redis.set(key_layout.scale_to_zero_key("a"), "[]")
    await registry.heartbeat(redis, worker("w3", "a", "loading"), ttl=30)
    assert len(await redis.keys(f"{key_layout.model_prefix('a')}*")) == 5  # workers, card, failure, zero, loading
    await registry.forget_model(redis, "a")
    assert await registry.known_models(redis) == {"b"}
    assert not await redis.keys(f"{key_layout.model_prefix('a')}*")
    assert (await registry.model_status(redis, "b")).live_workers == 1


async def test_a_crash_between_forgets_steps_leaves_a_known_model_without_workers(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await beat(redis, "w1", "a")

    async def lost(*_args: Any) -> int:
        raise RedisConnectionError("lost between the two steps")

    monkeypatch.setattr(redis, "srem", lost)
    with pytest.raises(RedisConnectionError):
        await registry.forget_model(redis, "a")
    monkeypatch.undo()
    assert await registry.known_models(redis) == {"a"}  # still listed (503, not 404)...
    status = await registry.model_status(redis, "a")
    assert (status.state, status.failure, status.info) == ("unavailable", None, None)  # ...with nothing behind it
    await registry.forget_model(redis, "a")  # forgetting again finishes it
    assert await registry.known_models(redis) == set()


async def test_a_fleet_change_overtaken_between_read_and_write_is_checked_again(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = FleetStore(redis)
    write, overtaken = fleet._change, list[bool]()

    async def after_another_change(**kwargs: Any) -> Any:
        if not overtaken:  # another gateway gives GPU 0 to "other" after this change read the fleet
            overtaken.append(True)
            await redis.hset(key_layout.FLEET_MODELS, "other", ModelSpec(name="other", gpus=["0"]).model_dump_json())
        return await write(**kwargs)

    monkeypatch.setattr(fleet, "_change", after_another_change)
    with pytest.raises(InvalidRequest, match="GPU 0 is already assigned"):
        await fleet.change("a", lambda _: ModelSpec(name="a", gpus=["0"]))
    assert set(await fleet.specs()) == {"other"}


async def test_run_states_are_written_and_dropped(redis: Redis) -> None:
    fleet = FleetStore(redis)
    await fleet.set_runs({name: ModelRun(state="serving", replicas=1) for name in ("a", "b", "c")})
    await fleet.set_runs({}, gone=["a", "b"])
    assert set(await fleet.runs()) == {"c"}
    await fleet.set_runs({"c": ModelRun(state="failed", replicas=1)}, gone=[])
    assert (await fleet.runs())["c"].state == "failed"


async def test_a_key_update_sets_and_removes_limits_in_one_step(redis: Redis) -> None:
    keys = KeyStore(redis)
    created = await keys.create(KeyCreate(name="team", rpm=10, tpm=100, models=["a"]))
    updated = await keys.update(created.id, KeyUpdate(rpm=20, max_queued=3, tpm=None, models=None))
    assert (updated.rpm, updated.max_queued, updated.tpm, updated.models) == (20, 3, None, None)
    assert (await keys.update(created.id, KeyUpdate())).rpm == 20  # nothing given: nothing changes
    assert (await keys.update(created.id, KeyUpdate(weight=2.5))).weight == 2.5
    assert (await keys.update(created.id, KeyUpdate(weight=None))).weight is None  # back to the default, 1


async def test_a_file_is_saved_and_forgotten_with_its_index_entry(redis: Redis) -> None:
    store = BatchStore(redis)
    for n in range(2):
        file = FileObject(id=f"file-{n}", bytes=1, created_at=int(time.time()), filename="in.jsonl", purpose="batch")
        await store.save_file(StoredFile(file=file, store_name=key_layout.stored_file_name(file.id)))
    assert await store.page(key_layout.FILES_INDEX, None, 10) == (["file-1", "file-0"], False)  # newest first
    await store.forget_file("file-1")
    assert await store.page(key_layout.FILES_INDEX, None, 10) == (["file-0"], False)
    assert await redis.get(key_layout.file_key("file-1")) is None


async def test_a_retired_batch_keeps_its_record_and_drops_its_bookkeeping(redis: Redis) -> None:
    store = BatchStore(redis)
    now = int(time.time())
    batch = BatchObject(
        id="batch_1", endpoint="/v1/embeddings", input_file_id="file-1", completion_window="24h",
        status="validating", created_at=now, expires_at=now + 60, model="m",
    )  # fmt: skip
    await store.create_batch(batch)
    assert await store.active() == ["batch_1"]
    assert await store.page(key_layout.BATCHES_INDEX, None, 10) == (["batch_1"], False)
    await store.set_plan("batch_1", [], total=1)
    await redis.rpush(key_layout.batch_done_key("batch_1"), b"0 1 0")
    await store.fold_reports("batch_1")
    await redis.hset(key_layout.batch_released_key("batch_1"), "0", 1)
    await store.retire("batch_1")
    assert await store.active() == []
    assert not await redis.exists(
        key_layout.batch_chunks_key("batch_1"),
        key_layout.batch_done_key("batch_1"),
        key_layout.batch_released_key("batch_1"),
    )
    assert await redis.hget(key_layout.batch_key("batch_1"), "plan") is None
    assert (await store.batch("batch_1")).request_counts.completed == 1
