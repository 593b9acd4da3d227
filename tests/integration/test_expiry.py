"""Expiry with OpenAI's contract, through the official SDK against real gateway and worker processes: ``expires_after``
on uploads (batch inputs expire after 30 days unless they ask), ``output_expires_after`` on batches, an expired file
gone from every route, the list, the file store and Redis, refusals naming the field, and finished batches purged
after the retention. Files here expire after a second: the gateways under test accept that (a setting OpenAI's one
hour minimum is the default of)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import FileObject

from conveyor import key_layout
from launcher.redis_server import RedisServer
from tests.conftest import Processes, sync_redis, wait_for
from tests.integration.conftest import CHAT, Stack
from tests.integration.test_batches import CHATS, EMBEDDINGS, chat_lines, embedding_lines, finished, wait_batch

DAYS_30 = 30 * 86_400
SHORT = "expiry-embed"  # configured on the short-lived gateways of this module; uploads only need it known


def jsonl_bytes(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def create(client: OpenAI, lines: list[dict[str, Any]], **kwargs: Any) -> FileObject:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl_bytes(lines))), purpose="batch", **kwargs)


def refusal(call: Callable[[], object]) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as refused:
        call()
    body = refused.value.body
    assert isinstance(body, dict)
    return body


def test_an_upload_expires_as_it_asks_and_a_batch_input_after_30_days(stack: Stack) -> None:
    client = stack.gateway.client()
    default = create(client, embedding_lines(1))
    assert default.expires_at == default.created_at + DAYS_30  # OpenAI's default for purpose batch
    asked = create(client, embedding_lines(1), expires_after={"anchor": "created_at", "seconds": 7200})
    assert asked.expires_at == asked.created_at + 7200
    assert client.files.retrieve(asked.id).expires_at == asked.expires_at
    listed = {f.id: f.expires_at for f in client.files.list(purpose="batch")}
    assert listed[asked.id] == asked.expires_at and listed[default.id] == default.expires_at


def test_a_batchs_output_and_error_files_expire_as_it_asks(stack: Stack) -> None:
    client = stack.gateway.client()
    inputs = chat_lines(3)
    inputs[1]["body"]["max_tokens"] = 99_999  # refused by the engine: the batch has an error file too
    input_id = create(client, inputs).id
    asked = client.batches.create(
        input_file_id=input_id,
        endpoint=CHATS,
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    plain = client.batches.create(input_file_id=input_id, endpoint=CHATS, completion_window="24h")
    asked, plain = wait_batch(client, asked.id, finished), wait_batch(client, plain.id, finished)
    assert asked.status == plain.status == "completed"
    for file_id in (asked.output_file_id, asked.error_file_id):
        output = client.files.retrieve(file_id or "")
        assert output.purpose == "batch_output"
        assert output.expires_at == output.created_at + 7200  # anchored at the file's creation, as OpenAI's are
    assert client.files.retrieve(plain.output_file_id or "").expires_at is None  # not asked: kept until deleted


def test_a_bad_expiry_policy_is_a_400_naming_the_field(stack: Stack) -> None:
    client = stack.gateway.client()
    lines = embedding_lines(1)

    def upload(policy: Any) -> Callable[[], object]:
        return lambda: create(client, lines, expires_after=policy)

    for seconds in (3599, DAYS_30 + 1):
        body = refusal(upload({"anchor": "created_at", "seconds": seconds}))
        assert body["param"] == "expires_after.seconds" and body["type"] == "invalid_request_error"
    wrong_anchor = {"anchor": "last_active_at", "seconds": 7200}
    assert refusal(upload(wrong_anchor))["param"] == "expires_after.anchor"
    input_id = create(client, lines).id

    def batch(policy: Any) -> Callable[[], object]:
        return lambda: client.batches.create(
            input_file_id=input_id, endpoint=EMBEDDINGS, completion_window="24h", output_expires_after=policy
        )

    assert refusal(batch({"anchor": "created_at", "seconds": 60}))["param"] == "output_expires_after.seconds"
    assert refusal(batch(wrong_anchor))["param"] == "output_expires_after.anchor"
    assert refusal(batch({"anchor": "created_at", "seconds": "soon"}))["param"] == "output_expires_after.seconds"
    assert refusal(batch("an hour"))["param"] == "output_expires_after"
    # what the SDK would not send, but a hand-made form can
    url = f"{stack.gateway.base_url}/v1/files"
    form_file = {"file": ("in.jsonl", jsonl_bytes(lines))}
    for fields, param in [
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "an hour"}, "expires_after.seconds"),
        ({"expires_after[seconds]": "7200"}, "expires_after.anchor"),
        ({"expires_after": '{"anchor": "created_at", "seconds": '}, "expires_after"),
    ]:
        answer = httpx.post(url, data={"purpose": "batch", **fields}, files=form_file, timeout=10)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param
    whole = {"expires_after": json.dumps({"anchor": "created_at", "seconds": 7200})}  # one JSON field works too
    made = httpx.post(url, data={"purpose": "batch", **whole}, files=form_file, timeout=10).json()
    assert made["expires_at"] == made["created_at"] + 7200


def test_an_expired_file_is_gone_from_every_route_the_store_and_redis(spawn: Processes) -> None:
    gateway = spawn.gateway(models=SHORT, min_expiry_seconds="1")
    client = gateway.client()
    kept = create(client, embedding_lines(1, SHORT))
    # created_at is in whole seconds, so a file given N seconds lives between N - 1 and N: 3 leaves the checks below
    # at least 2 s before it goes (with 1, a file made late in a second was gone before it could be read)
    expiring = create(client, embedding_lines(1, SHORT), expires_after={"anchor": "created_at", "seconds": 3})
    assert expiring.expires_at == expiring.created_at + 3
    path = spawn.files_dir / key_layout.stored_file_name(expiring.id)
    assert path.exists() and client.files.content(expiring.id).text

    def expired() -> bool:
        try:
            client.files.retrieve(expiring.id)
        except openai.NotFoundError:
            return True
        return False

    wait_for(expired, 10, "the file to expire")  # at most 3 s of the gateway's clock
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(expiring.id)
    listed = [f.id for f in client.files.list()]
    assert expiring.id not in listed and kept.id in listed
    with sync_redis(spawn.redis_url) as redis:
        wait_for(lambda: not path.exists() and not redis.exists(key_layout.file_key(expiring.id)), 15, "the sweep")
        assert redis.zscore(key_layout.FILES_INDEX, expiring.id) is None
        assert redis.zscore(key_layout.FILES_EXPIRING, expiring.id) is None
    assert client.files.retrieve(kept.id).id == kept.id


@pytest.fixture
def own_procs(own_redis: RedisServer, tmp_path: Path) -> Iterator[Processes]:
    """Processes on a Redis of this test's own: its gateway is surely the one that sweeps (the sweeper's retention is
    the sweeping gateway's setting)."""
    procs = Processes(own_redis.url, files_dir=tmp_path / "files")
    yield procs
    procs.stop_all()


def test_a_finished_batch_is_purged_after_the_retention_and_its_files_stay(own_procs: Processes) -> None:
    gateway = own_procs.gateway(models=CHAT, batch_retention_seconds="1")
    own_procs.fake_worker(CHAT)
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=create(client, chat_lines(3)).id, endpoint=CHATS, completion_window="24h"
    )
    done = wait_batch(client, batch.id, finished)
    assert done.status == "completed" and done.output_file_id
    parts = own_procs.files_dir / "batches" / batch.id  # its chunks' results, now in its output file
    wait_for(lambda: not any(parts.rglob("*.jsonl")), 10, "the chunks' parts to leave the store")

    def purged() -> bool:
        try:
            client.batches.retrieve(batch.id)
        except openai.NotFoundError:
            return True
        return False

    wait_for(purged, 15, "the batch to be purged")
    assert batch.id not in [b.id for b in client.batches.list()]
    with sync_redis(own_procs.redis_url) as redis:
        assert not redis.keys(f"{key_layout.batch_key(batch.id)}*")  # its record and bookkeeping
        assert redis.zscore(key_layout.BATCHES_INDEX, batch.id) is None
        assert redis.zscore(key_layout.FINISHED_BATCHES, batch.id) is None
    assert client.files.retrieve(done.output_file_id).id == done.output_file_id  # files follow their own expiry
    assert client.files.content(done.output_file_id).text.count("\n") == 3
