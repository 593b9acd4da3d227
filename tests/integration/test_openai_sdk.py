"""The official openai SDK against a real gateway, real redis-server and real worker processes (fake engine)."""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai.types import CreateEmbeddingResponse

from tests.conftest import Processes, scrape
from tests.integration.conftest import CHAT, EMBED, IDLE, Stack
from worker.engines.fake import fake_tokens, fake_vector

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def expected_chat_text(max_tokens: int) -> str:
    return "".join(fake_tokens("user: What is the capital of France?", max_tokens))


def test_chat_completion(stack: Stack) -> None:
    response = stack.gateway.client().chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=7)
    assert response.choices[0].message.content == expected_chat_text(7)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 7
    assert response.model == CHAT


def test_chat_completion_stream_joins_to_the_same_text(stack: Stack) -> None:
    stream = stack.gateway.client().chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=9, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_chat_text(9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


def test_completion_sync_and_stream(stack: Stack) -> None:
    client = stack.gateway.client()
    full = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5)
    assert full.choices[0].text == "".join(fake_tokens("Once upon a time", 5))
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5, stream=True)
        if c.choices
    )
    assert streamed == full.choices[0].text


def test_unknown_fields_pass_through_to_the_worker(stack: Stack) -> None:
    # n is honoured by the engine; top_k is unknown to the gateway and must simply travel with the job
    response = stack.gateway.client().chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=3, n=2, extra_body={"top_k": 5}
    )
    assert [c.index for c in response.choices] == [0, 1]


def test_embeddings_single_batch_and_tokens(stack: Stack) -> None:
    client = stack.gateway.client()
    single = client.embeddings.create(model=EMBED, input="hello world", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(fake_vector("hello world", 32))
    batch = client.embeddings.create(model=EMBED, input=["a", "b", "c"], encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.data[2].embedding == pytest.approx(fake_vector("c", 32))
    tokens = client.embeddings.create(model=EMBED, input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert tokens.data[1].embedding == pytest.approx(fake_vector([4, 5], 32))


def test_embeddings_base64(stack: Stack) -> None:
    raw = stack.gateway.client().embeddings.with_raw_response.create(model=EMBED, input=["x"], encoding_format="base64")
    payload = raw.http_response.json()["data"][0]["embedding"]
    assert isinstance(payload, str)
    decoded = struct.unpack("<32f", base64.b64decode(payload))
    assert list(decoded) == pytest.approx(fake_vector("x", 32), abs=1e-6)
    # the SDK's default asks for base64 and decodes it itself
    default = stack.gateway.client().embeddings.create(model=EMBED, input="x")
    assert default.data[0].embedding == pytest.approx(fake_vector("x", 32), abs=1e-6)


def test_models_list_and_retrieve(stack: Stack) -> None:
    client = stack.gateway.client()
    status = {m.id: m.to_dict()["status"] for m in client.models.list()}
    assert status[CHAT] == status[EMBED] == "serving"
    assert status[IDLE] == "unavailable"  # configured but nobody serves it
    assert client.models.retrieve(EMBED).id == EMBED
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_model_is_404_model_not_found(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        stack.gateway.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


def test_configured_model_without_worker_is_503_at_once(stack: Stack) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        stack.gateway.client(timeout=5).chat.completions.create(model=IDLE, messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.code == "no_live_worker"


def test_embedding_request_to_generation_model_is_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.gateway.client().embeddings.create(model=CHAT, input="x")
    assert caught.value.code == "unsupported_model_capability"


def test_validation_error_is_400_naming_the_field(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.gateway.client().chat.completions.create(model=CHAT, messages=MESSAGES, temperature=7)
    assert caught.value.param == "temperature"
    body = caught.value.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code"}


def test_engine_side_validation_error_is_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.gateway.client().chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=5000)
    assert "maximum context length" in caught.value.message


def test_stream_error_before_first_token_is_an_http_error(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError):
        list(
            stack.gateway.client().chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=5000, stream=True)
        )


def test_gateway_answers_health_ready_and_metrics(stack: Stack) -> None:
    import httpx

    base = stack.gateway.base_url
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/ready")
    assert ready.status_code == 503  # idle-model has no worker
    assert ready.json()["models"][IDLE]["live_workers"] == 0
    assert ready.json()["models"][CHAT]["live_workers"] == 1
    stack.gateway.client().chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=1)
    text = httpx.get(f"{base}/metrics").text
    assert f'conveyor_requests_total{{endpoint="/v1/chat/completions",model="{CHAT}",status="200"}}' in text


def test_concurrent_embeddings_share_engine_calls_and_each_gets_its_own_answer(session_processes: Processes) -> None:
    """Eight SDK clients at once against a worker that gathers embedding requests for up to 0.5 s: they share
    engine calls (the worker's histogram says how many per call), and each gets its own vector, usage and index."""
    model = "merging-embed"
    gateway = session_processes.gateway(models=model)
    worker = session_processes.fake_worker(model, embed=True, env={"CONVEYOR_WORKER_EMBED_BATCH_WAIT": "0.5"})
    texts = [" ".join(["word"] * (i + 1)) + f" {i}" for i in range(8)]
    client = gateway.client()

    def embed(text: str) -> CreateEmbeddingResponse:
        return client.embeddings.create(model=model, input=text, encoding_format="float")

    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(embed, texts))
    for text, answer in zip(texts, answers, strict=True):
        assert answer.data[0].index == 0
        assert answer.data[0].embedding == pytest.approx(fake_vector(text, 32))
        assert answer.usage.prompt_tokens == len(text.split())
    samples = scrape(f"http://127.0.0.1:{worker.info.metrics_port}/metrics")
    calls = samples[f'conveyor_worker_embedding_call_requests_count{{model="{model}"}}']
    assert samples[f'conveyor_worker_embedding_call_requests_sum{{model="{model}"}}'] == len(texts)
    assert calls < len(texts)
