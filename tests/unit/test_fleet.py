"""The fleet's desired state in Redis: a change is checked against the rest and never overtakes another one."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from conveyor.errors import InvalidRequest
from conveyor.fleet import FleetStore, ModelSpec


async def test_two_changes_at_once_cannot_both_take_one_gpu(redis: Redis) -> None:
    fleet = FleetStore(redis)
    results = await asyncio.gather(
        fleet.change("a", lambda _: ModelSpec(name="a", gpus=["0"])),
        fleet.change("b", lambda _: ModelSpec(name="b", gpus=["0"])),
        return_exceptions=True,
    )
    assert sum(isinstance(r, InvalidRequest) for r in results) == 1
    assert len(await fleet.specs()) == 1


async def test_a_change_sees_the_spec_as_it_is_and_can_remove_it(redis: Redis) -> None:
    fleet = FleetStore(redis)
    await fleet.replace([ModelSpec(name="a", replicas=1)])
    await asyncio.gather(
        *(
            fleet.change("a", lambda s: s.model_copy(update={"replicas": s.replicas + 1}) if s else None)
            for _ in range(5)
        )
    )
    assert (await fleet.specs())["a"].replicas == 6  # no lost update
    await fleet.change("a", lambda _: None)
    assert await fleet.specs() == {} and await fleet.saved()
    with pytest.raises(InvalidRequest, match="listed twice"):
        await fleet.replace([ModelSpec(name="x"), ModelSpec(name="x")])
