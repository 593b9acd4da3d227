"""What a Redis Cluster client refuses, checked on fakeredis: a script whose KEYS span hash slots, an MGET across
slots, and any transaction (MULTI/EXEC, WATCH). The control-plane stores (``conveyor.keys``, ``conveyor.fleet``,
``gateway.batch_store``), the registry and the model directory are run under those rules; every script the stores
register must be called here, so a new one cannot skip the check."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import key_slot

from conveyor import key_layout, registry
from conveyor.batch_lines import FileObject, StoredFile
from conveyor.filestore import LocalFileStore
from conveyor.fleet import FleetStore, ModelSpec
from conveyor.keys import KeyCreate, KeyStore, KeyUpdate
from conveyor.outage import Outage
from gateway.batch_store import BatchStore
from gateway.directory import ModelDirectory
from gateway.settings import GatewaySettings
from gateway.sweeper import Sweeper, Swept
from tests.unit.test_batch_bookkeeping import batch

log = logging.getLogger("test")


class ClusterRefuses(AssertionError):
    """What a Redis Cluster client would refuse before sending anything."""


def one_slot(what: str, keys: Iterable[bytes | str]) -> list[str]:
    names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    slots = {key_slot(name.encode()) for name in names}
    if len(slots) != 1:
        raise ClusterRefuses(f"{what} with keys in {len(slots)} hash slots: {names}")
    return names


Calls = list[tuple[AsyncScript, list[str]]]


@pytest.fixture
def cluster_rules(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Apply the cluster client's refusals to every ``redis.asyncio.Redis``; returns the script calls made."""
    calls: Calls = []
    call_script, pipeline, mget = AsyncScript.__call__, Redis.pipeline, Redis.mget

    async def checked_script(self: AsyncScript, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        calls.append((self, one_slot("a script", keys or ())))
        return await call_script(self, keys, args, client)

    def checked_pipeline(self: Redis, transaction: bool = True, shard_hint: Any = None) -> Any:
        if transaction:
            raise ClusterRefuses("a transaction (MULTI/EXEC)")
        return pipeline(self, transaction, shard_hint)

    def checked_mget(self: Redis, keys: Any, *args: Any) -> Any:
        one_slot("MGET", [keys, *args] if isinstance(keys, (bytes, str)) else [*keys, *args])
        return mget(self, keys, *args)

    monkeypatch.setattr(AsyncScript, "__call__", checked_script)
    monkeypatch.setattr(Redis, "pipeline", checked_pipeline)
    monkeypatch.setattr(Redis, "mget", checked_mget)
    return calls


async def test_the_rules_refuse_what_a_cluster_refuses(cluster_rules: Calls, redis: Redis) -> None:
    script = redis.register_script("return #KEYS")
    assert await script(keys=[key_layout.MODELS_KEY, key_layout.FLEET_MODELS]) == 2  # one tag: one slot
    with pytest.raises(ClusterRefuses, match="2 hash slots"):
        await script(keys=[key_layout.MODELS_KEY, key_layout.model_workers_key("m")])
    with pytest.raises(ClusterRefuses, match="0 hash slots"):
        await script(keys=[])  # a cluster cannot route it to the node of the keys it touches
    with pytest.raises(ClusterRefuses, match="MGET"):
        await redis.mget([key_layout.model_failure_key("a"), key_layout.model_failure_key("b")])
    with pytest.raises(ClusterRefuses, match="transaction"):
        redis.pipeline()


def scripts_of(*stores: object) -> set[AsyncScript]:
    return {v for store in stores for v in vars(store).values() if isinstance(v, AsyncScript)}


async def test_every_control_plane_script_takes_keys_of_one_slot(cluster_rules: Calls, redis: Redis) -> None:
    keys, fleet, batches = KeyStore(redis), FleetStore(redis), BatchStore(redis)

    created = await keys.create(KeyCreate(name="team", rpm=10, tpm=100))
    await keys.update(created.id, KeyUpdate(name="team-2", rpm=20, tpm=None))
    await keys.revoke(created.id)

    await fleet.replace([ModelSpec(name="a")])
    await fleet.change("b", lambda _: ModelSpec(name="b"))
    await fleet.set_runs({}, gone=["a"])

    file = FileObject(id="file-1", bytes=1, created_at=int(time.time()), filename="in.jsonl", purpose="batch")
    await batches.save_file(StoredFile(file=file, store_name="files/file-1.jsonl"))
    await batches.forget_file("file-1")
    await batches.create_batch(batch("batch_1"))
    await batches.move("batch_1", ("validating",), "in_progress")
    await redis.rpush(key_layout.batch_done_key("batch_1"), b"0 1 0")
    await batches.fold_reports("batch_1")
    await batches.take_lease("batch_1", "me", 10)
    await batches.drop_lease("batch_1", "me")
    await batches.retire("batch_1")
    await batches.purge_batch("batch_1")

    called = {script for script, _ in cluster_rules}
    missing = scripts_of(keys, fleet, batches) - called
    assert not missing, f"scripts this test does not call (add a call): {[s.script[:60] for s in missing]}"


async def test_the_sweeper_keeps_to_the_rules(cluster_rules: Calls, redis: Redis, tmp_path: Path) -> None:
    batches = BatchStore(redis)
    now = time.time()
    file = FileObject(
        id="file-9", bytes=1, created_at=int(now), filename="in.jsonl", purpose="batch", expires_at=int(now) + 1
    )
    await batches.save_file(StoredFile(file=file, store_name="files/file-9.jsonl"))
    await batches.create_batch(batch("batch_1"))
    await batches.retire("batch_1")
    await batches.create_batch(batch("batch_2"))  # active: its input is looked up before a file is removed
    sweeper = Sweeper(batches, LocalFileStore(tmp_path), GatewaySettings(batch_retention_seconds=1), Outage(log, "t"))
    assert await sweeper.round() > 0
    assert await sweeper.sweep(now + 60) == Swept(files=1, batches=1)


async def test_the_registry_and_directory_keep_to_the_rules(cluster_rules: Calls, redis: Redis) -> None:
    for worker_id, model in (("w1", "a"), ("w2", "b")):
        info = registry.WorkerInfo(
            worker_id=worker_id, model=model, capabilities=["embed"], max_jobs=1, host="h", pid=1, started=0
        )
        await registry.heartbeat(redis, info, ttl=30)
    assert {w.worker_id for w in await registry.all_workers(redis)} == {"w1", "w2"}  # info keys: a slot each
    await ModelDirectory(redis, GatewaySettings()).allow_zero(["a", "b"])  # failure keys: a slot per model
    await registry.forget_model(redis, "a")  # the model's slot and the control plane's
    assert await registry.known_models(redis) == {"b"}
