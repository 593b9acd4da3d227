"""The command line: help on every flag, one-line errors for bad settings, and `conveyor status`."""

from __future__ import annotations

import argparse
import time

import pytest
from redis.asyncio import Redis

from conveyor import key_layout, registry, status
from launcher import cli


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_every_flag_has_help() -> None:
    for parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"


def test_a_missing_setting_is_one_line_naming_what_to_set() -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["worker", "--engine", "fake"])
    message = str(exited.value.code)
    assert (
        message == "conveyor worker: model: Field required (set CONVEYOR_WORKER_MODEL, or its flag where there is one)"
    )


def test_a_placeholder_key_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_GATEWAY_API_KEYS", "changeme")
    with pytest.raises(SystemExit) as exited:
        cli.main(["gateway"])
    assert "\n" not in str(exited.value.code) and "CONVEYOR_GATEWAY_API_KEYS" in str(exited.value.code)


async def test_status_shows_models_workers_gateways_and_batches(redis: Redis) -> None:
    info = registry.WorkerInfo(
        worker_id="w-1", model="chat", capabilities=["generate"], max_jobs=4, host="box", address="10.1.2.3", pid=42,
        metrics_port=9100, started=time.time() - 60,
    )  # fmt: skip
    await registry.heartbeat(redis, info, ttl=30)
    await registry.gateway_heartbeat(redis, "10.1.2.4:8000", ttl=30)
    await redis.zadd(key_layout.queue_name("chat"), {"job-1": 1, "job-2": 2})
    await redis.sadd(key_layout.ACTIVE_BATCHES, "batch_1")
    await redis.hset(
        key_layout.batch_key("batch_1"), mapping={"status": "in_progress", "completed": 5, "failed": 1, "total": 64}
    )
    text = status.render(await status.snapshot(redis))
    lines = text.splitlines()
    assert lines[1].split() == ["chat", "serving", "1", "0", "2", "0", "-"]
    assert "w-1" in text and "10.1.2.3:9100" in text and "10.1.2.4:8000" in text
    assert "batch_1  in_progress  5     1       64" in text
