"""Batches survive what a queue must: a gateway restarted mid-batch, a worker SIGKILLed mid-chunk, two gateway
replicas driving at once. In each, every line is answered exactly once."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

from openai import OpenAI

from tests.conftest import Processes, metric, wait_for
from tests.integration.test_batches import CHATS, chat_lines, finished, jsonl, upload, wait_batch

MODEL = "bulk-chat"


def lines_for(count: int) -> list[dict[str, object]]:
    out = chat_lines(count, max_tokens=10)
    for item in out:
        item["body"]["model"] = MODEL  # type: ignore[index]
    return out


def assert_each_line_once(client: OpenAI, batch_id: str, count: int) -> None:
    batch = wait_batch(client, batch_id, finished, timeout=120)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (count, 0)
    answered = Counter(a["custom_id"] for a in jsonl(client, batch.output_file_id))
    assert answered == Counter(f"chat-{i}" for i in range(count))  # every line, exactly once


def test_a_gateway_restarted_mid_batch_finishes_it(procs: Processes, tmp_path: Path) -> None:
    first = procs.gateway(models=MODEL, batch_chunk_lines="4")
    procs.fake_worker(MODEL, "--fake-token-delay", "0.02", env={"CONVEYOR_WORKER_BULK_JOBS": "1"})
    client = first.client()
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, lines_for(60)), endpoint=CHATS, completion_window="24h"
    )
    wait_batch(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 8)
    first.process.send_signal(signal.SIGKILL)  # its driver dies holding the batch's lease
    first.process.wait(10)
    second = procs.gateway(models=MODEL, batch_chunk_lines="4")
    assert_each_line_once(second.client(), batch.id, 60)


def test_a_worker_killed_mid_chunk_loses_no_line_and_duplicates_none(procs: Processes, tmp_path: Path) -> None:
    gateway = procs.gateway(models=MODEL, batch_chunk_lines="8")
    slow = {"CONVEYOR_WORKER_BULK_JOBS": "1"}
    victim = procs.fake_worker(MODEL, "--fake-token-delay", "0.05", env=slow)
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, lines_for(40)), endpoint=CHATS, completion_window="24h"
    )
    wait_for(lambda: metric(victim.metrics(), "conveyor_worker_running_jobs") >= 1, 20, "a chunk running")
    victim.process.send_signal(signal.SIGKILL)  # mid-chunk: its lease lapses, another worker runs the chunk again
    victim.process.wait(10)
    procs.fake_worker(MODEL, "--fake-token-delay", "0.01", env=slow)
    assert_each_line_once(client, batch.id, 40)


def test_two_gateways_drive_batches_without_running_a_chunk_twice_into_the_output(
    procs: Processes, tmp_path: Path
) -> None:
    gateways = [procs.gateway(models=MODEL, batch_chunk_lines="3") for _ in range(2)]
    worker = procs.fake_worker(MODEL, "--fake-token-delay", "0.005", env={"CONVEYOR_WORKER_BULK_JOBS": "2"})
    ids = []
    for i, gateway in enumerate(gateways):  # one batch created through each; both drivers see both
        client = gateway.client()
        file_id = upload(client, tmp_path, lines_for(30))
        ids.append(client.batches.create(input_file_id=file_id, endpoint=CHATS, completion_window="24h").id)
        assert i == 0 or ids[0] != ids[1]
    for batch_id in ids:
        assert_each_line_once(gateways[0].client(), batch_id, 30)
    chunks_run = metric(worker.metrics(), "conveyor_worker_jobs_total", kind="bulk", outcome="ok")
    assert chunks_run == 20  # 2 x 30 lines in chunks of 3: each chunk ran once


def test_a_gateway_that_cannot_read_the_file_store_leaves_the_batch_to_one_that_can(
    procs: Processes, tmp_path: Path
) -> None:
    blind = procs.gateway(models=MODEL, env={"CONVEYOR_FILES_URL": str(tmp_path / "another-store")})
    seeing = procs.gateway(models=MODEL)
    procs.fake_worker(MODEL, env={"CONVEYOR_WORKER_BULK_JOBS": "1"})
    input_file = upload(seeing.client(), tmp_path, lines_for(8))
    # created through the blind one: its driver is woken first, takes the lease and fails to read the input
    batch = blind.client().batches.create(input_file_id=input_file, endpoint=CHATS, completion_window="24h")
    assert_each_line_once(seeing.client(), batch.id, 8)
