"""The Files and Batches APIs through the official SDK, against real gateway and worker processes (fake engine)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Batch

from tests.conftest import Processes, metric, scrape, wait_for
from tests.integration.conftest import CHAT, EMBED, Stack

SLOW = "slow-chat"  # served only by the slow workers of the tests that start their own
EMBEDDINGS = "/v1/embeddings"
QUIET_EMBED = "embed-batch-alone"
CHATS = "/v1/chat/completions"


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def embedding_lines(count: int, model: str = EMBED) -> list[dict[str, Any]]:
    """Single texts, lists of texts and one base64 request: merged where their parameters agree."""
    out = []
    for i in range(count):
        text: str | list[str] = f"text number {i} " * (1 + i % 3)
        if i % 5 == 0:
            text = [f"first of {i}", f"second of {i} two words"]
        body: dict[str, Any] = {"model": model, "input": text}
        if i % 7 == 0:
            body["encoding_format"] = "base64"
        out.append(line(f"emb-{i}", EMBEDDINGS, body))
    return out


def chat_lines(count: int, max_tokens: int = 3, model: str = CHAT) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": "hello"}]
    return [
        line(f"chat-{i}", CHATS, {"model": model, "messages": [*messages, {"role": "user", "content": str(i)}],
                                    "max_tokens": max_tokens})
        for i in range(count)
    ]  # fmt: skip


def upload(client: OpenAI, tmp_path: Path, lines: list[dict[str, Any]], raw: bytes | None = None) -> str:
    path = tmp_path / f"input-{time.monotonic_ns()}.jsonl"
    path.write_bytes(raw if raw is not None else b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="batch").id


def wait_batch(client: OpenAI, batch_id: str, until: Callable[[Batch], bool], timeout: float = 60) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} ({batch.request_counts}) after {timeout} s")
        time.sleep(0.1)


def finished(batch: Batch) -> bool:
    return batch.status in ("completed", "failed", "expired", "cancelled")


def jsonl(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_an_embedding_batch_answers_every_line_once_exactly_as_the_api_would(
    stack: Stack, spawn: Processes, tmp_path: Path
) -> None:
    """On a worker of its own, which no interactive request has reached: on the shared one, another test's requests
    just before would hold the lines to one engine call each for the engine share's quiet window."""
    worker = spawn.fake_worker(QUIET_EMBED, "--task", "embed", embed=True)
    client = stack.gateway.client()
    before = worker.metrics()
    inputs = embedding_lines(150, model=QUIET_EMBED)  # three chunks of 64 lines
    file_id = upload(client, tmp_path, inputs)
    created = client.batches.create(
        input_file_id=file_id, endpoint=EMBEDDINGS, completion_window="24h", metadata={"job": "nightly"}
    )
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    batch = wait_batch(client, created.id, finished)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (150, 150, 0)
    assert batch.error_file_id is None and batch.completed_at and batch.in_progress_at and batch.finalizing_at
    output = jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(x["custom_id"] for x in inputs)  # each line exactly once
    by_id = {o["custom_id"]: o for o in output}
    for item in inputs:  # the same body through /v1/embeddings gives the same vectors and usage
        alone = httpx.post(f"{stack.gateway.base_url}/v1/embeddings", json=item["body"], timeout=10).json()
        answer = by_id[item["custom_id"]]
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        body = answer["response"]["body"]
        assert body["data"] == alone["data"]
        assert body["usage"] == alone["usage"]
    output_file = client.files.retrieve(batch.output_file_id or "")
    assert output_file.purpose == "batch_output" and output_file.bytes > 0
    prompt_tokens = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output)
    assert batch.usage is not None and prompt_tokens > 0  # the batch's usage adds up its lines' own
    assert (batch.usage.input_tokens, batch.usage.output_tokens, batch.usage.total_tokens) == (
        prompt_tokens,
        0,
        prompt_tokens,
    )
    after = worker.metrics()  # the lines of a chunk ran as a few engine calls, not one each

    def calls(merged: str) -> float:
        name = "conveyor_worker_bulk_engine_calls_total"
        return metric(after, name, merged=merged) - metric(before, name, merged=merged)

    assert 0 < calls("yes") <= 3 * 2 and calls("no") == 0  # per chunk: one call of floats, one of base64


def test_a_line_the_engine_refuses_goes_to_the_error_file_with_its_openai_error(stack: Stack, tmp_path: Path) -> None:
    client = stack.gateway.client()
    inputs = chat_lines(5)
    inputs[2]["body"]["max_tokens"] = 99_999  # past the fake engine's context: refused 400, as vLLM would
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, inputs), endpoint=CHATS, completion_window="24h"
    )
    batch = wait_batch(client, batch.id, finished)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 1)
    (refused,) = jsonl(client, batch.error_file_id)
    assert refused["custom_id"] == "chat-2"
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["type"] == "invalid_request_error"
    answers = jsonl(client, batch.output_file_id)
    assert {a["custom_id"] for a in answers} == {"chat-0", "chat-1", "chat-3", "chat-4"}
    assert all(len(a["response"]["body"]["choices"][0]["message"]["content"].split()) == 3 for a in answers)
    usages = [a["response"]["body"]["usage"] for a in answers]  # the refused line counts no tokens
    assert batch.usage is not None and batch.usage.output_tokens == sum(u["completion_tokens"] for u in usages) == 12
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)


@pytest.mark.parametrize(
    ("raw", "code", "line_no"),
    [
        (b"this is not json\n", "invalid_json_line", 1),
        (json.dumps(line("a", "/v1/images", {"model": EMBED})).encode(), "invalid_url", 1),
        (b"".join(json.dumps(line(f"x{i}", EMBEDDINGS, {"model": "nobody", "input": "x"})).encode() + b"\n"
                  for i in range(3)), "model_not_found", 1),
        (json.dumps(line("a", EMBEDDINGS, {"model": EMBED, "input": "x"})).encode() + b"\n"
         + json.dumps(line("a", EMBEDDINGS, {"model": EMBED, "input": "y"})).encode(), "duplicate_custom_id", 2),
        (json.dumps(line("a", EMBEDDINGS, {"model": EMBED})).encode(), "invalid_batch_line", 1),
    ],
    ids=["not-jsonl", "wrong-url", "unknown-model", "duplicate-id", "invalid-body"],
)  # fmt: skip
def test_an_invalid_upload_is_a_400_naming_the_line(
    stack: Stack, tmp_path: Path, raw: bytes, code: str, line_no: int
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        upload(stack.gateway.client(), tmp_path, [], raw=raw)
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == code
    assert error["message"].startswith(f"Line {line_no}:")


def test_refusals_are_openai_shaped(stack: Stack, tmp_path: Path) -> None:
    client = stack.gateway.client()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=EMBEDDINGS, completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    file_id = upload(client, tmp_path, embedding_lines(2))
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=file_id, endpoint=EMBEDDINGS, completion_window="1h")  # type: ignore[arg-type]
    done = wait_batch(
        client, client.batches.create(input_file_id=file_id, endpoint=EMBEDDINGS, completion_window="24h").id, finished
    )
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(done.id)  # a finished batch cannot be cancelled
    with pytest.raises(openai.BadRequestError):  # an output file is not a batch input
        client.batches.create(input_file_id=done.output_file_id or "", endpoint=EMBEDDINGS, completion_window="24h")


def test_a_batch_whose_lines_do_not_fit_it_fails_with_per_line_errors(stack: Stack, tmp_path: Path) -> None:
    client = stack.gateway.client()
    mixed = [*embedding_lines(3), line("chat", CHATS, {"model": CHAT, "messages": [{"role": "user", "content": "x"}]})]
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, mixed), endpoint=EMBEDDINGS, completion_window="24h"
    )
    batch = wait_batch(client, batch.id, finished)
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.data
    assert [e.line for e in batch.errors.data] == [4]


def test_files_and_batches_list_and_page_like_openai(stack: Stack, tmp_path: Path) -> None:
    client = stack.gateway.client()
    ids = [upload(client, tmp_path, embedding_lines(1)) for _ in range(3)]
    listed = [f.id for f in client.files.list(purpose="batch", limit=2)]  # the SDK pages on by itself
    assert listed[:3] == ids[::-1]  # newest first
    batches = [client.batches.create(input_file_id=i, endpoint=EMBEDDINGS, completion_window="24h").id for i in ids]
    first_page = client.batches.list(limit=2)
    assert [b.id for b in first_page.data] == batches[::-1][:2] and first_page.has_more
    assert [b.id for b in client.batches.list(limit=100)][:3] == batches[::-1]
    deleted = client.files.delete(ids[0]) if finished(wait_batch(client, batches[0], finished)) else None
    assert deleted is not None and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[0])


def slow_batch(spawn: Processes, tmp_path: Path, **gateway_settings: str) -> tuple[OpenAI, Batch]:
    """40 chat lines in 20 chunks of two 0.5 s lines, run one chunk at a time: ~10 s."""
    gateway = spawn.gateway(models=SLOW, batch_chunk_lines="2", **gateway_settings)
    spawn.fake_worker(SLOW, "--fake-token-delay", "0.05", env={"CONVEYOR_WORKER_BULK_JOBS": "1"})
    client = gateway.client()
    file_id = upload(client, tmp_path, chat_lines(40, max_tokens=10, model=SLOW))
    return client, client.batches.create(input_file_id=file_id, endpoint=CHATS, completion_window="24h")


def test_cancel_midway_delivers_what_finished_and_names_the_rest(spawn: Processes, tmp_path: Path) -> None:
    client, batch = slow_batch(spawn, tmp_path)
    running = wait_batch(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 4)
    samples = scrape(f"{spawn.gateways[0].base_url}/metrics")  # the dashboard's batch progress, read at the scrape
    pending, completed = (
        metric(samples, "conveyor_batch_lines", model=SLOW, state=state) for state in ("pending", "completed")
    )
    assert running.request_counts is not None and completed >= running.request_counts.completed >= 4
    assert pending + completed == 40 and pending > 0
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_batch(client, batch.id, finished)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    answered = jsonl(client, batch.output_file_id)
    unfinished = jsonl(client, batch.error_file_id)
    assert len(answered) == done and 4 <= done < 40
    assert len(answered) + len(unfinished) == 40  # every line: answered, or named as not run
    assert {u["error"]["code"] for u in unfinished} == {"batch_cancelled"}
    assert {a["custom_id"] for a in answered}.isdisjoint({u["custom_id"] for u in unfinished})


def test_an_expired_batch_delivers_what_finished(spawn: Processes, tmp_path: Path) -> None:
    client, batch = slow_batch(spawn, tmp_path, batch_window_seconds="3")
    batch = wait_batch(client, batch.id, finished, timeout=30)
    assert batch.status == "expired" and batch.expired_at
    assert batch.request_counts is not None
    answered, unfinished = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    assert 0 < len(answered) == batch.request_counts.completed < 40
    assert len(answered) + len(unfinished) == 40
    assert {u["error"]["code"] for u in unfinished} == {"batch_expired"}


def test_interactive_requests_pass_a_running_batch(spawn: Processes, tmp_path: Path) -> None:
    gateway = spawn.gateway(models=SLOW, batch_chunk_lines="4", max_queue_depth="4")
    spawn.fake_worker(SLOW, "--fake-token-delay", "0.05", "--max-jobs", "4", env={"CONVEYOR_WORKER_BULK_JOBS": "2"})
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, chat_lines(200, max_tokens=10, model=SLOW)),
        endpoint=CHATS,
        completion_window="24h",
    )  # 50 chunks: far more than the interactive queue's depth of 4, which the bulk lane does not count against
    wait_batch(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed > 0)
    for _ in range(3):
        answer = client.chat.completions.create(model=SLOW, messages=[{"role": "user", "content": "now"}], max_tokens=2)
        assert len((answer.choices[0].message.content or "").split()) == 2
    still = client.batches.retrieve(batch.id)
    assert still.status == "in_progress"  # answered while the batch was still running, not after it
    client.batches.cancel(batch.id)


def conveyor_batch_embed(gateway_url: str, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "launcher.cli", "batch", "embed", *args, "--base-url", f"{gateway_url}/v1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_conveyor_batch_embed_survives_ctrl_c_and_re_attaches(spawn: Processes, tmp_path: Path) -> None:
    model = "cli-embed"
    gateway = spawn.gateway(models=model)  # no worker yet: the batch waits, so Ctrl-C surely comes mid-way
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"sentence number {i}\n" for i in range(120)) + "\n")  # a blank last line is skipped
    output = tmp_path / "vectors.jsonl"
    state = output.with_name(output.name + ".batch.json")
    first = conveyor_batch_embed(gateway.base_url, str(texts), "--model", model, "-o", str(output), "--poll", "0.2")
    wait_for(lambda: state.exists() or first.poll() is not None, 30, "the batch to be created")
    batch_id = json.loads(state.read_text())["batch_id"]
    wait_for(lambda: gateway.client().batches.retrieve(batch_id).status == "in_progress", 30, "batch in progress")
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=30)
    assert first.returncode == 130, err
    assert "re-attach" in err and state.exists() and not output.exists()
    spawn.fake_worker(model, embed=True)
    second = conveyor_batch_embed(gateway.base_url, str(texts), "--model", model, "-o", str(output), "--poll", "0.2")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert f"re-attached to {batch_id}" in err and not state.exists()  # the same batch: no second one
    lines = [json.loads(x) for x in output.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"line-{i}" for i in range(1, 121)]
    assert all(len(x["response"]["body"]["data"][0]["embedding"]) == 32 for x in lines)


def test_an_oversized_upload_is_413_before_it_is_read(spawn: Processes, tmp_path: Path) -> None:
    gateway = spawn.gateway(models=EMBED, max_upload_bytes="4096")
    with pytest.raises(openai.APIStatusError) as refused:
        upload(gateway.client(), tmp_path, embedding_lines(100))  # ~9 KB
    assert refused.value.status_code == 413
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "request_too_large"
