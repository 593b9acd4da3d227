"""The garbage collector is settled once start-up is done, in the gateway and in the worker (``conveyor.gc_tuning``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import fakeredis
import pytest

from conveyor import gc_tuning, redis_client
from gateway.settings import GatewaySettings
from tests.unit.conftest import fake_connect, running_gateway
from worker import main as worker_main
from worker.engines.base import Engine
from worker.settings import WorkerSettings


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unsettled() -> Iterator[None]:
    """CPython's own collector settings for the test, and again after it."""
    threshold = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("unsettled")
def test_settle_freezes_what_start_up_built_and_still_collects_later_cycles() -> None:
    gc_tuning.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD
    later = _Cycle()
    assert gc.is_tracked(later)
    collected_before = sum(stats["collected"] for stats in gc.get_stats())
    del later
    gc.collect()
    assert sum(stats["collected"] for stats in gc.get_stats()) > collected_before


@pytest.mark.usefixtures("unsettled")
async def test_the_gateway_settles_the_collector_when_it_has_started(fake_server: fakeredis.FakeServer) -> None:
    async with running_gateway(fake_server, GatewaySettings(models=["gc-model"])):
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD


async def test_the_worker_settles_the_collector_once_its_engine_is_loaded(
    fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []
    settled = asyncio.Event()
    build_engine = worker_main.build_engine

    def traced_engine(settings: WorkerSettings) -> Engine:
        engine = build_engine(settings)
        start = engine.start

        async def started() -> None:
            await start()
            steps.append("engine started")

        monkeypatch.setattr(engine, "start", started)
        return engine

    def settle() -> None:
        steps.append("settled")
        settled.set()

    monkeypatch.setattr(worker_main, "build_engine", traced_engine)
    monkeypatch.setattr(gc_tuning, "settle", settle)
    monkeypatch.setattr(redis_client, "connect", lambda _url: fake_connect(fake_server))
    serving = asyncio.create_task(worker_main.serve(WorkerSettings(model="gc-model", engine="fake")))
    await asyncio.wait_for(settled.wait(), 30)
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    assert steps == ["engine started", "settled"]
