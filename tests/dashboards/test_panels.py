"""The dashboard tier: a real Prometheus on the shipped scrape config finds the gateway and every worker by itself
(HTTP service discovery from the registry), traffic of every kind is sent, and every query of every dashboard panel
that reads Conveyor's metrics returns a number. The vLLM panels run in the engine tier (a fake engine exports none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from launcher import redis_server
from launcher.redis_server import RedisServer
from tests.conftest import Gateway, Processes, run_embedding_batch, wait_for
from tests.dashboards.prom import Prometheus, panels, prometheus, require_answers

CHAT, EMBED, IDLE = "fake-chat", "fake-embed", "idle-model"
STREAM_TOKENS, TOKEN_DELAY = 10, 0.05  # a stream of ~0.5 s


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Gateway]:
    redis = RedisServer(redis_server.free_port(), tmp_path / "redis")
    redis.start()
    procs = Processes(redis.url, files_dir=tmp_path / "files")
    try:
        gateway = procs.gateway(models=f"{CHAT},{EMBED},{IDLE}")
        procs.fake_worker(CHAT, env={"CONVEYOR_WORKER_FAKE_TOKEN_DELAY": str(TOKEN_DELAY)})
        procs.fake_worker(EMBED, embed=True)
        procs.fake_worker(EMBED, embed=True)
        yield gateway
    finally:
        procs.stop_all()
        redis.stop()


@pytest.fixture
def prom(stack: Gateway, tmp_path: Path) -> Iterator[Prometheus]:
    with prometheus(stack.base_url, tmp_path) as server:
        yield server


def send_traffic(gateway: Gateway) -> None:
    """Successes, streams, a client that hangs up mid-stream, refusals, a deadline miss and a batch."""
    client = gateway.client()
    for i in range(5):
        client.embeddings.create(model=EMBED, input=f"text {i}")
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    for _ in range(3):
        stream = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=STREAM_TOKENS, stream=True
        )
        assert len(list(stream)) >= STREAM_TOKENS
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first chunk, then hang up: a 499
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT, messages=[], max_tokens=-1)
    with pytest.raises(openai.APIStatusError) as timed_out:  # 200 tokens take 10 s: the 1 s deadline passes
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=200,
            extra_headers={"x-conveyor-timeout": "1"},
        )  # fmt: skip
    assert timed_out.value.status_code == 504
    run_embedding_batch(client, EMBED, 6)
    keyed_traffic(gateway)


def keyed_traffic(gateway: Gateway) -> None:
    """A managed key with 3 requests a minute, sent 4: its usage and one refusal (last: from now on every request
    needs a key)."""
    env = os.environ | {"CONVEYOR_REDIS_URL": gateway.redis_url}
    create = [sys.executable, "-m", "launcher.cli", "keys", "create", "--name", "dash", "--rpm", "3", "--json"]
    secret = json.loads(subprocess.run(create, env=env, capture_output=True, text=True, check=True).stdout)["value"]
    keyed = gateway.client(api_key=secret)
    for i in range(3):
        keyed.embeddings.create(model=EMBED, input=f"keyed {i}")
    with pytest.raises(openai.RateLimitError):
        keyed.embeddings.create(model=EMBED, input="one too many")


def test_prometheus_discovers_the_gateway_and_every_worker_from_the_shipped_config(prom: Prometheus) -> None:
    wait_for(lambda: prom.scrapes(gateways=1, workers=3), timeout=30, what="the gateway and three workers scraped")


def test_every_panel_query_returns_data(stack: Gateway, prom: Prometheus) -> None:
    wait_for(lambda: prom.scrapes(gateways=1, workers=3), timeout=30, what="the gateway and three workers scraped")
    send_traffic(stack)
    conveyor_panels = [panel for panel in panels() if not panel.engine]
    assert len(conveyor_panels) >= 15
    require_answers(prom, conveyor_panels, timeout=30)


def test_metrics_mean_what_they_say(stack: Gateway, prom: Prometheus) -> None:
    """Streams are timed to their last byte, a hung-up stream is a 499, 4xx and 5xx are told apart."""
    wait_for(lambda: prom.scrapes(gateways=1, workers=3), timeout=30, what="the gateway and three workers scraped")
    send_traffic(stack)

    def value(expr: str) -> float:
        result = prom.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def counted() -> bool:
        return (
            value('sum(conveyor_requests_total{status="499"})') >= 1
            and value('sum(conveyor_requests_total{status="504"})') >= 1
        )

    wait_for(counted, timeout=30, what="the 499 and the 504 scraped")
    # over 0.25 s to the last byte: the 3 streams of STREAM_TOKENS tokens TOKEN_DELAY apart (~0.5 s each; timed at
    # their start they would be ~ms) and the 504 (1 s); the other chat requests took less
    chat = 'endpoint="/v1/chat/completions"'
    count, fast = "conveyor_request_duration_seconds_count", "conveyor_request_duration_seconds_bucket"
    over = f'sum({count}{{{chat}}}) - sum({fast}{{{chat}, le="0.25"}})'
    assert value(over) == 4
    assert value('sum(conveyor_requests_total{status=~"4.."})') >= 3  # 404, 400, 499
    assert value('sum(conveyor_requests_total{status=~"5.."})') == 1  # the 504
