"""A managed API key's usage with real vLLM workers: what the engine reported, streams included (vLLM is asked for
its usage chunk even when the client did not ask for it, and the client does not see it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from openai import OpenAI

from conveyor import key_layout
from launcher import processes, redis_server
from tests.engine.conftest import CHAT, EMBED, RealStack


def keys_cli(real_stack: RealStack, *args: str) -> Any:
    env = os.environ | {"CONVEYOR_REDIS_URL": real_stack.redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "keys", *args, "--json"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class KeyedGateway:
    base_url: str
    key: dict[str, Any]


@pytest.fixture
def keyed_gateway(real_stack: RealStack) -> Iterator[KeyedGateway]:
    """A gateway of its own beside the real stack's, and a managed key. Once a managed key exists every gateway that
    sees it demands keys for good, so the key is used only through this gateway and every trace of it is deleted
    after the test: the session's other gateways go on needing none."""
    port = redis_server.free_port()
    gateway = processes.start_gateway(real_stack.redis_url, port)
    key: dict[str, Any] = keys_cli(real_stack, "create", "--name", "engine-usage", "--tpm", "100000")
    try:
        yield KeyedGateway(f"http://127.0.0.1:{port}", key)
    finally:
        processes.stop(gateway)
        with redis.Redis.from_url(real_stack.redis_url) as client:
            for pattern in ("apikey*", "rate:*", "usage:*"):
                if found := list(client.scan_iter(f"{key_layout.CONTROL}:{pattern}")):
                    client.delete(*found)
            assert not client.exists(key_layout.API_KEYS_INDEX), "a managed key is left: every gateway would demand one"


def test_usage_of_a_key_is_what_vllm_reported(real_stack: RealStack, keyed_gateway: KeyedGateway) -> None:
    request: dict[str, Any] = {
        "model": CHAT,
        "temperature": 0,
        "max_tokens": 12,
        "messages": [{"role": "user", "content": "Name a colour."}],
    }
    key = keyed_gateway.key
    with OpenAI(base_url=f"{keyed_gateway.base_url}/v1", api_key=key["value"], max_retries=0) as sdk:
        plain = sdk.chat.completions.create(**request)
        streamed = list(sdk.chat.completions.create(**request, stream=True))
        vectors = sdk.embeddings.create(model=EMBED, input=["a short text", "another one"])
    assert plain.usage is not None
    assert all(chunk.usage is None and chunk.choices for chunk in streamed)  # no usage chunk it did not ask for
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.choices[0].message.content
    rows = keys_cli(real_stack, "usage", key["id"])
    by_model = {row["model"]: row for row in rows}
    chat = by_model[CHAT]
    # greedy decoding: the stream used exactly what the same request used unstreamed
    assert (chat["requests"], chat["prompt_tokens"], chat["completion_tokens"]) == (
        2,
        2 * plain.usage.prompt_tokens,
        2 * plain.usage.completion_tokens,
    )
    embed = by_model[EMBED]
    assert (embed["requests"], embed["embedding_tokens"]) == (1, vectors.usage.prompt_tokens)
