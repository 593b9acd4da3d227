from __future__ import annotations

import base64
import struct
from typing import Any, cast

import pytest

from conveyor.contract import JobKind
from conveyor.errors import InvalidRequest
from worker.engines.base import Resume
from worker.engines.fake import FakeEngine, fake_tokens, fake_vector

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}


async def test_chat_is_deterministic_and_counts_usage() -> None:
    engine = FakeEngine("m")
    first = await engine.run(JobKind.CHAT, CHAT, "r1")
    second = await engine.run(JobKind.CHAT, CHAT, "r2")
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["choices"][0]["message"]["content"] == "".join(fake_tokens("user: hi there", 4))
    assert first["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert engine.running_requests() == 0


async def _chunks(engine: FakeEngine, body: dict[str, Any], resume: Resume | None = None) -> list[dict[str, Any]]:
    return [cast(dict[str, Any], p.chunk) async for p in engine.stream(JobKind.CHAT, body, "r", resume)]


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


async def test_stream_joins_to_run_and_reports_usage_last() -> None:
    engine = FakeEngine("m")
    chunks = await _chunks(engine, CHAT | {"stream_options": {"include_usage": True}})
    assert _text(chunks) == (await engine.run(JobKind.CHAT, CHAT, "r"))["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_a_continuation_goes_on_exactly_where_the_stream_was_cut() -> None:
    """Resumed after two tokens with max_tokens reduced by them, the fake gives the rest of the same completion, no
    role chunk again, and usage for the whole request; from a wrong token it goes elsewhere, as a model would."""
    engine = FakeEngine("m")
    body = CHAT | {"max_tokens": 6, "stream_options": {"include_usage": True}}
    whole = [p async for p in engine.stream(JobKind.CHAT, body, "r")]
    sent = tuple(i for p in whole[:3] for i in p.token_ids or ())  # the role chunk and two tokens
    assert len(sent) == 2
    rest = await _chunks(engine, body | {"max_tokens": 4}, Resume(sent))
    assert _text([cast(dict[str, Any], p.chunk) for p in whole[:3]]) + _text(rest) == _text(
        [cast(dict[str, Any], p.chunk) for p in whole]
    )
    assert rest[-1]["usage"] == cast(dict[str, Any], whole[-1].chunk)["usage"]
    assert "role" not in rest[0]["choices"][0]["delta"]
    wrong = ((sent[0] + 1) % 12, sent[1])
    assert _text(await _chunks(engine, body | {"max_tokens": 4}, Resume(wrong))) != _text(rest)


async def test_too_long_request_is_refused_before_streaming() -> None:
    stream = FakeEngine("m").stream(JobKind.CHAT, CHAT | {"max_tokens": 10_000}, "r")
    with pytest.raises(InvalidRequest):
        await anext(stream)


async def test_embeddings_float_and_base64_agree() -> None:
    engine = FakeEngine("m", embed=True, embedding_dim=8)
    floats = await engine.run(JobKind.EMBEDDING, {"input": ["a", "b"]}, "r")
    packed = await engine.run(JobKind.EMBEDDING, {"input": ["a", "b"], "encoding_format": "base64"}, "r")
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][1]["embedding"]))
    assert floats["data"][1]["embedding"] == pytest.approx(decoded, abs=1e-6)
    assert floats["data"][0]["embedding"] == fake_vector("a", 8)
    assert sum(x * x for x in fake_vector("a", 8)) == pytest.approx(1.0)


async def test_dimensions_past_the_embedding_size_are_refused_as_vllm_refuses_them() -> None:
    engine = FakeEngine("m", embed=True, embedding_dim=8)
    short = await engine.run(JobKind.EMBEDDING, {"model": "m", "input": "a", "dimensions": 4}, "r1")
    assert len(short["data"][0]["embedding"]) == 4
    with pytest.raises(InvalidRequest) as refused:  # it built a vector of that size: 10**10 floats filled the memory
        await engine.run(JobKind.EMBEDDING, {"model": "m", "input": "a", "dimensions": 10**10}, "r2")
    assert refused.value.param == "dimensions" and "[1, 8]" in refused.value.message


async def test_a_continuation_cut_after_its_last_token_only_ends() -> None:
    engine = FakeEngine("m")
    body = CHAT | {"max_tokens": 4, "stream_options": {"include_usage": True}}
    whole = [p async for p in engine.stream(JobKind.CHAT, body, "r")]
    sent = tuple(i for p in whole for i in p.token_ids or ())
    rest = await _chunks(engine, body | {"max_tokens": 0}, Resume(sent))
    assert _text(rest) == "" and [c["choices"][0]["finish_reason"] for c in rest if c["choices"]] == ["length"]
    assert rest[-1]["usage"] == cast(dict[str, Any], whole[-1].chunk)["usage"]
