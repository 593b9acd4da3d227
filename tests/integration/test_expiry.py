"""Expiry with OpenAI's contract, through the official SDK against real gateway and worker processes: ``expires_after``
on uploads (batch inputs expire after 30 days unless they ask), ``output_expires_after`` on batches, and refusals
naming the field."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import FileObject

from tests.integration.conftest import Stack
from tests.integration.test_batches import CHATS, EMBEDDINGS, chat_lines, embedding_lines, finished, wait_batch

DAYS_30 = 30 * 86_400


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
