from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from conveyor import contract, key_layout
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


def test_an_engines_answer_is_written_compact_in_utf8_with_nan_as_null() -> None:
    answer = {"object": "list", "data": [{"embedding": [0.1, -2.5e-07, 1e16], "index": 0}], "text": "café ✓"}
    written = contract.json_bytes(answer)
    assert json.loads(written) == answer
    assert "café ✓".encode() in written  # UTF-8, not escaped to ASCII
    assert b" " not in written.replace("café ✓".encode(), b"")  # compact
    not_finite = {"logprob": float("-inf"), "x": float("nan")}
    assert json.loads(contract.json_bytes(not_finite)) == {"logprob": None, "x": None}  # as model_dump_json writes them


@pytest.mark.parametrize(
    "answer",
    [{"big": 2**70}, {"text": "\ud800"}, {"top_logprobs": {1: -0.5}}],
    ids=["integer past 64 bits", "lone surrogate", "key not a string"],
)
def test_what_orjson_refuses_is_still_written(answer: dict[str, object]) -> None:
    written = contract.json_bytes(answer)
    assert written == json.dumps(answer, separators=(",", ":")).encode()


def test_json_text_passes_through_untouched() -> None:
    assert contract.json_bytes(b'{"a": 1}') == b'{"a": 1}'
    assert contract.json_bytes('{"é": 1}') == '{"é": 1}'.encode()


def model_keys(model: str, request_id: str) -> list[str]:
    return [
        key_layout.abort_key(model, request_id),
        key_layout.stream_channel(model, request_id),
        key_layout.progress_key(model, request_id),
        key_layout.migrations_key(model, request_id),
        key_layout.model_workers_key(model),
        key_layout.model_loading_key(model),
        key_layout.model_failure_key(model),
        key_layout.scale_to_zero_key(model),
        key_layout.model_card_key(model),
        key_layout.wake_channel(model),
        key_layout.stream_lane_key(model),
        key_layout.stream_lane_key(model, bulk=True),
        key_layout.stream_job_prefix(model) + request_id,
        key_layout.stream_lease_prefix(model) + request_id,
    ]


def control_keys() -> list[str]:
    return [
        key_layout.MODELS_KEY,
        key_layout.GATEWAYS_KEY,
        key_layout.FLEET_MODELS,
        key_layout.FLEET_STATUS,
        key_layout.FLEET_SUPERVISOR,
        key_layout.FLEET_SAVED,
        key_layout.FILES_INDEX,
        key_layout.BATCHES_INDEX,
        key_layout.ACTIVE_BATCHES,
        key_layout.file_key("f"),
        key_layout.batch_key("b"),
        key_layout.batch_chunks_key("b"),
        key_layout.batch_done_key("b"),
        key_layout.batch_driver_key("b"),
        key_layout.batch_released_key("b"),
        key_layout.API_KEYS_INDEX,
        key_layout.API_KEY_HASHES,
        key_layout.API_KEY_NAMES,
        key_layout.api_key_key("k"),
        key_layout.rate_window_key("k", "requests"),
        key_layout.rate_window_key("k", "tokens"),
        key_layout.key_jobs_key("k"),
        key_layout.usage_key("k", "2026-12-03"),
    ]


def test_key_names_are_distinct_per_request_and_model() -> None:
    names = [
        *model_keys("a", "r"),
        key_layout.abort_key("a", "s"),
        key_layout.progress_key("a", "s"),
        *model_keys("b", "r"),
        *control_keys(),
        key_layout.inbox_key("a"),
        key_layout.inbox_key("b"),
        key_layout.queue_name("a"),
        key_layout.worker_info_key("a"),
    ]
    assert len(set(names)) == len(names)
    assert all(name.startswith(key_layout.KEY_PREFIX + ":") for name in names)


def test_a_models_keys_share_one_slot_and_the_control_plane_another() -> None:
    """What lets one script join them on a Redis Cluster: a model's keys (and its jobs') carry the model as their
    hash tag, every key of the control plane one tag of its own."""
    for model in ("a", "org/model-7B", "conveyor"):
        assert len({key_slot(key.encode()) for key in model_keys(model, "r")}) == 1, model
    assert len({key_slot(key.encode()) for key in control_keys()}) == 1
    assert key_slot(key_layout.model_card_key("a").encode()) != key_slot(key_layout.MODELS_KEY.encode())


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
