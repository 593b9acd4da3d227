"""A managed API key's usage with real vLLM workers: what the engine reported, streams included (vLLM is asked for
its usage chunk even when the client did not ask for it, and the client does not see it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import wait_for
from tests.engine.conftest import CHAT, EMBED, RealStack


def keys_cli(real_stack: RealStack, *args: str) -> Any:
    env = os.environ | {"CONVEYOR_REDIS_URL": real_stack.redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "keys", *args, "--json"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def managed_key(real_stack: RealStack) -> Iterator[dict[str, Any]]:
    """A key for this test only: revoked after it, so the session's other gateways need no key again."""
    key: dict[str, Any] = keys_cli(real_stack, "create", "--name", "engine-usage", "--tpm", "100000")
    yield key
    keys_cli(real_stack, "revoke", key["id"])
    wait_for(
        lambda: httpx.get(f"{real_stack.base_url}/v1/models").status_code == 200,
        timeout=10,
        what="authentication off again once the only managed key is revoked",
    )


def test_usage_of_a_key_is_what_vllm_reported(real_stack: RealStack, managed_key: dict[str, Any]) -> None:
    request: dict[str, Any] = {
        "model": CHAT,
        "temperature": 0,
        "max_tokens": 12,
        "messages": [{"role": "user", "content": "Name a colour."}],
    }
    with OpenAI(base_url=f"{real_stack.base_url}/v1", api_key=managed_key["value"], max_retries=0) as sdk:
        plain = sdk.chat.completions.create(**request)
        streamed = list(sdk.chat.completions.create(**request, stream=True))
        vectors = sdk.embeddings.create(model=EMBED, input=["a short text", "another one"])
    assert plain.usage is not None
    assert all(chunk.usage is None and chunk.choices for chunk in streamed)  # no usage chunk it did not ask for
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.choices[0].message.content
    rows = keys_cli(real_stack, "usage", managed_key["id"])
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
