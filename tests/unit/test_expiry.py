"""Files that expire and batches whose records are purged, on fakeredis and a local file store, with a clock the test
moves: a file is 404 from the second it expires (before any sweep), the sweeper removes its bytes and record, keeps
the input of a running batch, purges a finished batch after the retention, and only one sweeper sweeps at a time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.batch_lines import BatchObject, ExpiresAfter, FileObject, StoredFile
from conveyor.errors import InvalidRequest, NotFound
from conveyor.filestore import LocalFileStore
from conveyor.outage import Outage
from gateway import expiry
from gateway.batch_store import BatchStore
from gateway.directory import ModelDirectory
from gateway.files import FileService
from gateway.settings import GatewaySettings
from gateway.sweeper import Sweeper, Swept

T0 = 1_800_000_000  # the test's clock starts here
HOUR = 3600


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(redis: Redis, clock: Clock) -> BatchStore:
    return BatchStore(redis, clock=clock)


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


def sweeper(store: BatchStore, files: LocalFileStore, retention: float = 30 * 86_400) -> Sweeper:
    settings = GatewaySettings(batch_retention_seconds=retention)
    return Sweeper(store, files, settings, Outage(logging.getLogger("test"), "test"))


async def blocks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def add_file(
    store: BatchStore, files: LocalFileStore, file_id: str, expires_at: int | None, purpose: str = "batch"
) -> Path:
    """A file with bytes in the store and its record in Redis; returns where its bytes are."""
    name = key_layout.stored_file_name(file_id)
    await files.write(name, blocks(b'{"custom_id": "a"}\n'))
    file = FileObject.model_validate(
        {"id": file_id, "bytes": 19, "created_at": T0, "filename": "in.jsonl", "purpose": purpose}
        | {"expires_at": expires_at}
    )
    await store.save_file(StoredFile(file=file, store_name=name))
    return files.root / name


def batch(batch_id: str, input_file_id: str = "file-in") -> BatchObject:
    return BatchObject(
        id=batch_id,
        endpoint="/v1/embeddings",
        input_file_id=input_file_id,
        completion_window="24h",
        status="validating",
        created_at=T0,
        expires_at=T0 + 86_400,
        model="m",
    )


async def in_index(redis: Redis, index: str, member: str) -> bool:
    return await redis.zscore(index, member) is not None


async def test_an_expired_file_is_404_at_once_on_every_route_before_any_sweep(
    redis: Redis, store: BatchStore, files: LocalFileStore, clock: Clock
) -> None:
    await add_file(store, files, "file-1", expires_at=T0 + HOUR)
    service = FileService(files, store, ModelDirectory(redis, GatewaySettings()), min_expiry=HOUR)
    clock.now = T0 + HOUR - 1
    assert (await service.get("file-1")).expires_at == T0 + HOUR
    assert [f.id for f in (await service.list(None, None, 10, "desc"))[0]] == ["file-1"]
    clock.now = T0 + HOUR  # expired: nothing has swept, the record is still in Redis
    assert await redis.exists(key_layout.file_key("file-1"))
    for read in (service.get, service.content, service.delete):
        with pytest.raises(NotFound) as refused:
            await read("file-1")
        assert refused.value.code == "file_not_found"
    assert (await service.list(None, None, 10, "desc"))[0] == []


async def test_the_sweep_removes_an_expired_files_bytes_record_and_index_entries(
    redis: Redis, store: BatchStore, files: LocalFileStore
) -> None:
    expiring = await add_file(store, files, "file-1", expires_at=T0 + HOUR)
    later = await add_file(store, files, "file-2", expires_at=T0 + 2 * HOUR)
    never = await add_file(store, files, "file-3", expires_at=None, purpose="batch_output")
    assert await in_index(redis, key_layout.FILES_EXPIRING, "file-1")
    assert not await in_index(redis, key_layout.FILES_EXPIRING, "file-3")  # expires never: not in the expiring index
    sweep = sweeper(store, files)
    assert await sweep.sweep(T0 + HOUR - 1) == Swept()
    assert expiring.exists()
    assert await sweep.sweep(T0 + HOUR) == Swept(files=1)
    assert not expiring.exists() and later.exists() and never.exists()
    assert not await redis.exists(key_layout.file_key("file-1"))
    assert not await in_index(redis, key_layout.FILES_INDEX, "file-1")
    assert not await in_index(redis, key_layout.FILES_EXPIRING, "file-1")
    assert await sweep.sweep(T0 + 100 * 86_400) == Swept(files=1)  # file-2; file-3 stays until deleted
    assert never.exists() and await store.stored("file-3") is not None


async def test_a_crash_after_the_bytes_went_leaves_a_record_the_next_sweep_removes(
    redis: Redis, store: BatchStore, files: LocalFileStore
) -> None:
    path = await add_file(store, files, "file-1", expires_at=T0 + HOUR)
    path.unlink()  # a sweeper died between removing the bytes and the record
    assert await sweeper(store, files).sweep(T0 + HOUR) == Swept(files=1)
    assert not await redis.exists(key_layout.file_key("file-1"))


async def test_the_input_of_a_running_batch_is_kept_until_the_batch_finished(
    store: BatchStore, files: LocalFileStore, clock: Clock
) -> None:
    path = await add_file(store, files, "file-in", expires_at=T0 + HOUR)
    await store.create_batch(batch("batch_1", "file-in"))
    clock.now = T0 + HOUR
    sweep = sweeper(store, files)
    assert await sweep.sweep() == Swept()  # its chunks still read their lines from it
    assert path.exists()
    with pytest.raises(NotFound):  # the API answers 404 all the same
        await store.file("file-in")
    await store.move("batch_1", ("validating",), "cancelled")
    await store.retire("batch_1")
    assert await sweep.sweep() == Swept(files=1)
    assert not path.exists()


async def test_a_finished_batch_is_purged_after_the_retention_and_its_files_are_not(
    redis: Redis, store: BatchStore, files: LocalFileStore, clock: Clock
) -> None:
    output = await add_file(store, files, "file-out", expires_at=None, purpose="batch_output")
    await store.create_batch(batch("batch_1"))
    await store.create_batch(batch("batch_2"))  # still running: never purged
    await store.set_plan("batch_1", [], total=1)
    await store.take_lease("batch_1", "driver", 15)
    clock.now = T0 + 10
    await store.move("batch_1", ("validating",), "completed", output_file_id="file-out")
    await store.retire("batch_1")
    await redis.rpush(key_layout.batch_done_key("batch_1"), b"0 1 0")  # a late report of a chunk run twice
    clock.now = T0 + 20
    await store.retire("batch_1")  # retired again (a driver repeating the step): still finished at T0 + 10
    sweep = sweeper(store, files, retention=HOUR)
    assert await sweep.sweep(T0 + 10 + HOUR - 1) == Swept()
    assert (await store.batch("batch_1")).status == "completed"
    assert await sweep.sweep(T0 + 10 + HOUR) == Swept(batches=1)
    with pytest.raises(NotFound):
        await store.batch("batch_1")
    leftovers = [
        key_layout.batch_key("batch_1"),
        key_layout.batch_chunks_key("batch_1"),
        key_layout.batch_done_key("batch_1"),
        key_layout.batch_released_key("batch_1"),
        key_layout.batch_driver_key("batch_1"),
    ]
    assert not await redis.exists(*leftovers)
    assert not await in_index(redis, key_layout.BATCHES_INDEX, "batch_1")
    assert not await in_index(redis, key_layout.FINISHED_BATCHES, "batch_1")
    assert await store.page(key_layout.BATCHES_INDEX, None, 10) == (["batch_2"], False)
    assert output.exists() and (await store.file("file-out")).file.id == "file-out"
    assert await sweep.sweep(T0 + 100 * 86_400) == Swept()  # batch_2 runs on


async def test_one_gateway_sweeps_at_a_time(
    redis: Redis, store: BatchStore, files: LocalFileStore, clock: Clock
) -> None:
    first, second = sweeper(store, files), sweeper(store, files)
    assert await first.round() > 0  # takes the lease (nothing to sweep yet)
    clock.now = T0 + HOUR
    path = await add_file(store, files, "file-1", expires_at=T0 + HOUR)
    await second.round()
    assert path.exists()  # the lease is the first's
    await first.round()
    assert not path.exists()
    await store.release(key_layout.SWEEPER_LEASE, first.holder)  # the first stopped
    assert await store.hold(key_layout.SWEEPER_LEASE, second.holder, 60)


async def test_an_output_file_expires_its_lifetime_after_it_was_written(
    redis: Redis, store: BatchStore, files: LocalFileStore, clock: Clock
) -> None:
    service = FileService(files, store, ModelDirectory(redis, GatewaySettings()), min_expiry=HOUR)
    clock.now = T0 + 50
    kept = await service.add_output("file-a", "a.jsonl", blocks(b"x\n"))
    expiring = await service.add_output("file-b", "b.jsonl", blocks(b"x\n"), lifetime=2 * HOUR)
    assert kept is not None and kept.expires_at is None
    assert expiring is not None and expiring.expires_at == expiring.created_at + 2 * HOUR == T0 + 50 + 2 * HOUR
    assert await in_index(redis, key_layout.FILES_EXPIRING, "file-b")
    assert not await in_index(redis, key_layout.FILES_EXPIRING, "file-a")


async def test_a_batch_keeps_its_output_expiry(store: BatchStore) -> None:
    await store.create_batch(batch("batch_1"), output_expiry=2 * HOUR)
    await store.create_batch(batch("batch_2"))
    assert (await store.output_expiry("batch_1"), await store.output_expiry("batch_2")) == (2 * HOUR, None)
    assert (await store.batch("batch_1")).id == "batch_1"  # the field is not part of OpenAI's batch object


# ---- the policy as requests give it -----------------------------------------------------------------------------


def test_the_sdks_form_fields_and_one_json_field_give_the_same_policy() -> None:
    policy = ExpiresAfter(anchor="created_at", seconds=7200)
    assert expiry.from_form("created_at", "7200", None) == policy
    assert expiry.from_form(None, None, '{"anchor": "created_at", "seconds": 7200}') == policy
    assert expiry.from_form(None, None, None) is None
    assert expiry.checked_seconds(policy, "expires_after", HOUR) == 7200


@pytest.mark.parametrize(
    ("anchor", "seconds", "whole", "param"),
    [
        ("last_active_at", "7200", None, "expires_after.anchor"),
        (None, "7200", None, "expires_after.anchor"),
        ("created_at", None, None, "expires_after.seconds"),
        ("created_at", "an hour", None, "expires_after.seconds"),
        ("created_at", "7200.5", None, "expires_after.seconds"),
        (None, None, '{"anchor": "created_at", "seconds": 7200', "expires_after"),
        (None, None, '"created_at"', "expires_after"),
        (None, None, '{"anchor": "created_at", "seconds": 7200, "when": 1}', "expires_after.when"),
        ("created_at", "7200", '{"anchor": "created_at", "seconds": 7200}', "expires_after"),
    ],
    ids=["anchor", "no-anchor", "no-seconds", "words", "fraction", "bad-json", "not-object", "extra", "both"],
)
def test_a_malformed_policy_is_a_400_naming_the_field(
    anchor: str | None, seconds: str | None, whole: str | None, param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        expiry.from_form(anchor, seconds, whole)
    assert refused.value.param == param


@pytest.mark.parametrize("seconds", [0, HOUR - 1, 30 * 86_400 + 1])
def test_seconds_outside_openais_range_are_refused(seconds: int) -> None:
    with pytest.raises(InvalidRequest) as refused:
        expiry.checked_seconds(ExpiresAfter(anchor="created_at", seconds=seconds), "output_expires_after", HOUR)
    assert refused.value.param == "output_expires_after.seconds"
    assert expiry.checked_seconds(ExpiresAfter(anchor="created_at", seconds=1), "x", minimum=1) == 1  # a test's


def test_openais_minimum_is_the_default_and_a_shorter_one_is_a_setting() -> None:
    assert GatewaySettings().min_expiry_seconds == HOUR
    assert GatewaySettings(min_expiry_seconds=1).min_expiry_seconds == 1
    assert GatewaySettings().batch_retention_seconds == 30 * 86_400
