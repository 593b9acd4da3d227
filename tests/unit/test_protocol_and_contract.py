from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from conveyor import contract
from conveyor.contract import ErrorInfo, JobEnvelope, JobKind, StreamFrame
from conveyor.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


def test_unknown_fields_are_kept() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_k": 3, "guided_json": {"a": 1}}
    )
    dumped = request.model_dump(exclude_unset=True)
    assert dumped["top_k"] == 3 and dumped["guided_json"] == {"a": 1}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "robot", "content": "hi"}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
        {"model": "", "messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_invalid_chat_requests_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize("value", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_embedding_inputs_accepted(value: object) -> None:
    assert EmbeddingRequest.model_validate({"model": "m", "input": value}).input == value


@pytest.mark.parametrize("value", ["", [], [""], [[]], {"a": 1}])
def test_embedding_inputs_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": value})


def test_completion_prompt_forms() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2]]}).prompt == [[1, 2]]


def test_envelope_round_trips_through_json() -> None:
    envelope = JobEnvelope(
        request_id="r1", model="m", kind=JobKind.CHAT, body={"x": [1, "y"]}, stream=True, deadline=time.time() + 5
    )
    again = JobEnvelope.model_validate(contract.loads(contract.dumps(envelope.model_dump(mode="json"))))
    assert again == envelope
    assert 4 < again.seconds_left() <= 5


def test_key_names_are_distinct_per_request_and_model() -> None:
    names = {
        contract.inbox_key("a"),
        contract.inbox_key("b"),
        contract.abort_key("a"),
        contract.stream_channel("a"),
        contract.queue_name("a"),
        contract.model_workers_key("a"),
        contract.model_loading_key("a"),
        contract.model_failure_key("a"),
        contract.model_card_key("a"),
        contract.worker_info_key("a"),
    }
    assert len(names) == 10
    assert all(name.startswith(contract.KEY_PREFIX + ":") for name in names)


def test_stream_frames_round_trip_and_keep_chunk_text_untouched() -> None:
    chunk = StreamFrame.chunk(7, '{"choices":[{"delta":{"content":"a|b"}}]}')
    assert StreamFrame.decode(chunk.encode()) == chunk
    assert chunk.payload == b'{"choices":[{"delta":{"content":"a|b"}}]}'
    info = ErrorInfo(status=400, message="bad", type="invalid_request_error")
    assert StreamFrame.decode(StreamFrame.failure(2, info).encode()).error_info() == info
    assert StreamFrame.decode(b"3|end|") == StreamFrame(3, "end")
    with pytest.raises(ValueError, match="unknown stream frame"):
        StreamFrame.decode(b"1|bogus|")


def test_replies_name_their_request_and_keep_the_body_untouched() -> None:
    reply = contract.Reply("r1", body=b'{"a":"x|y"}')
    assert contract.Reply.decode(reply.encode()) == reply
    info = ErrorInfo(status=503, message="lost", type="service_unavailable", code="worker_lost")
    assert contract.Reply.decode(contract.Reply("r2", error=info).encode()).error == info
    with pytest.raises(ValueError, match="unknown reply kind"):
        contract.Reply.decode(b"r3|maybe|{}")
