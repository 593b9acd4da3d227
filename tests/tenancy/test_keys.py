"""Managed API keys across two gateway processes on one Redis: authentication, the limits (exact across both), the
headers and 429s, revocation, and usage counted from the engine's own figures."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

import httpx
import openai
import pytest
from openai.types import Batch

from conveyor import key_layout
from conveyor.keys import USAGE_COUNTERS
from tests.conftest import metric, sync_redis, wait_for
from tests.tenancy.conftest import CHAT, EMBED, SLOW, STATIC_KEY, Fleet


def new_key(fleet: Fleet, *flags: str) -> dict[str, Any]:
    """A managed key made with ``conveyor keys create`` (a unique name per call)."""
    created: dict[str, Any] = fleet.cli_json("create", "--name", f"t-{uuid.uuid4().hex[:8]}", *flags)
    return created


def client(fleet: Fleet, key: str, gateway: int = 0) -> openai.OpenAI:
    return fleet.gateways[gateway].client(api_key=key)


def test_a_key_made_with_the_cli_works_on_both_gateways_and_turns_authentication_on(fleet: Fleet) -> None:
    key = new_key(fleet)
    assert key["value"].startswith("sk-cv-") and key["value"] not in json.dumps(fleet.cli_json("list"))
    for gateway in (0, 1):
        answer = client(fleet, key["value"], gateway).chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert answer.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            client(fleet, "sk-cv-not-a-key", gateway).models.list()
        assert httpx.get(f"{fleet.gateways[gateway].base_url}/v1/models").status_code == 401
        # the static key keeps working beside managed ones
        assert client(fleet, STATIC_KEY, gateway).models.list().data


async def burst(fleet: Fleet, key: str, total: int, body: dict[str, Any]) -> list[httpx.Response]:
    """``total`` requests at once, half on each gateway."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with (
        httpx.AsyncClient(base_url=fleet.gateways[0].base_url, headers=headers, limits=limits, timeout=120) as a,
        httpx.AsyncClient(base_url=fleet.gateways[1].base_url, headers=headers, limits=limits, timeout=120) as b,
    ):
        return list(await asyncio.gather(*((a, b)[i % 2].post("/v1/embeddings", json=body) for i in range(total))))


def test_a_burst_of_1000_against_a_100_rpm_key_admits_exactly_100(fleet: Fleet) -> None:
    key = new_key(fleet, "--rpm", "100")
    responses = asyncio.run(burst(fleet, key["value"], 1000, {"model": EMBED, "input": "one two"}))
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) == 100 and len(refused) == 900, {r.status_code for r in responses}
    # each admission saw the one before it: the remaining counts are 99 down to 0, each once
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted) == list(range(100))
    assert {r.headers["x-ratelimit-limit-requests"] for r in admitted} == {"100"}
    for response in refused[:20]:
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
        assert "Limit 100, Used 100, Requested 1" in error["message"]
        # computed from the window: the burst's first second leaves it a little under 60 s from now
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert 0 < int(response.headers["retry-after-ms"]) <= 60_000
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    samples = {}
    for gateway in fleet.gateways:
        text = httpx.get(f"{gateway.base_url}/metrics").text
        samples[gateway.port] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("conveyor_key_rate_limited_total") and f'key="{key["name"]}"' in line
        )
    assert sum(samples.values()) == 900


def test_tokens_per_minute_hold_exactly_across_both_gateways(fleet: Fleet) -> None:
    """Token-id inputs are charged exactly what the engine reports, so nothing is reconciled mid-burst."""
    key = new_key(fleet, "--tpm", "100")
    responses = asyncio.run(burst(fleet, key["value"], 40, {"model": EMBED, "input": list(range(1, 11))}))
    admitted = [r for r in responses if r.status_code == 200]
    assert len(admitted) == 10
    assert sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in admitted) == list(range(0, 100, 10))
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    too_large = httpx.post(
        f"{fleet.gateways[0].base_url}/v1/embeddings",
        headers={"Authorization": f"Bearer {key['value']}"},
        json={"model": EMBED, "input": list(range(1, 200))},
    )
    assert too_large.status_code == 429 and "Request too large" in too_large.json()["error"]["message"]
    assert "retry-after" not in too_large.headers  # waiting cannot help


def test_estimated_output_is_reserved_then_reconciled_with_the_real_usage(fleet: Fleet) -> None:
    key = new_key(fleet, "--tpm", "1000")
    openai_client = client(fleet, key["value"])
    raw = openai_client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "one two three"}], max_tokens=300
    )
    charged = 1000 - int(raw.headers["x-ratelimit-remaining-tokens"])
    assert charged >= 300  # the reservation: its max_tokens, and the prompt's estimate
    used = raw.parse().usage
    assert used is not None
    # on a Redis Cluster the key's accounting (usage and tokens window, one script) runs just after the answer is
    # delivered (``worker.streams_source``): the next request is sent once the usage counts the first
    wait_for(lambda: _usage_totals(fleet, key)["requests"] == 1, what="the first request's usage counted")
    after = openai_client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "one two three"}], max_tokens=300
    )
    # the first request now counts what the engine reported, not what was reserved
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000 - used.total_tokens - charged


def _usage_totals(fleet: Fleet, key: dict[str, Any]) -> dict[str, int]:
    """The key's usage of the day as the admin API lists it, summed (``_summed``)."""
    with fleet.admin() as admin:
        return _summed(admin.get(f"/admin/keys/{key['name']}/usage", params={"days": 1}).json()["data"])


def _summed(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Usage rows (one per model), every counter summed over them."""
    return {name: sum(row[name] for row in rows) for name in USAGE_COUNTERS}


def test_max_queued_bounds_a_keys_unfinished_jobs(fleet: Fleet) -> None:
    key = new_key(fleet, "--max-queued", "2")
    slow = client(fleet, key["value"])
    body: dict[str, Any] = {"model": SLOW, "messages": [{"role": "user", "content": "hold"}], "max_tokens": 100}
    first = slow.chat.completions.create(**body, stream=True)
    second = client(fleet, key["value"], 1).chat.completions.create(**body, stream=True)
    next(iter(first)), next(iter(second))  # both admitted and running
    with pytest.raises(openai.RateLimitError) as refused:
        slow.chat.completions.create(**body, stream=True)
    assert refused.value.code == "rate_limit_exceeded"
    first.close()  # the client goes: its job no longer counts
    wait_for(lambda: _admitted(fleet, key["value"], body), timeout=10, what="a free place once a stream was closed")
    second.close()


def _admitted(fleet: Fleet, key: str, body: dict[str, Any]) -> bool:
    try:
        client(fleet, key).chat.completions.create(**(body | {"max_tokens": 1}))
    except openai.RateLimitError:
        return False
    return True


def test_a_key_sees_and_uses_only_its_models(fleet: Fleet) -> None:
    key = new_key(fleet, "--models", CHAT)
    limited = client(fleet, key["value"], 1)
    assert [m.id for m in limited.models.list().data] == [CHAT]
    with pytest.raises(openai.NotFoundError) as refused:
        limited.embeddings.create(model=EMBED, input="x")
    assert refused.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        limited.models.retrieve(EMBED)


def test_a_revoked_key_stops_on_both_gateways(fleet: Fleet) -> None:
    key = new_key(fleet)
    for gateway in (0, 1):
        client(fleet, key["value"], gateway).embeddings.create(model=EMBED, input="x")
    with fleet.admin(1) as admin:
        revoked = admin.delete(f"/admin/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    for gateway in (0, 1):  # the admission script reads the key's record: inference stops at once
        with pytest.raises(openai.AuthenticationError):
            client(fleet, key["value"], gateway).embeddings.create(model=EMBED, input="x")
    for gateway in (0, 1):  # every other route within key_cache_seconds (at most 1 s)
        wait_for(
            lambda g=gateway: _refused(client(fleet, key["value"], g)), timeout=5, what="the key refused everywhere"
        )


def _refused(api: openai.OpenAI) -> bool:
    try:
        api.models.list()
    except openai.AuthenticationError:
        return True
    return False


def test_usage_per_key_is_the_engines_own_count_streams_included(fleet: Fleet) -> None:
    key = new_key(fleet)
    api = client(fleet, key["value"])
    other = client(fleet, key["value"], 1)
    messages = [{"role": "user", "content": "count these five words"}]
    expected = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "embedding_tokens": 0}

    plain = api.chat.completions.create(model=CHAT, messages=messages, max_tokens=3)
    assert plain.usage is not None
    expected["prompt_tokens"] += plain.usage.prompt_tokens
    expected["completion_tokens"] += plain.usage.completion_tokens
    # a stream without include_usage: the engine is asked for it anyway, and the client does not see it
    chunks = list(other.chat.completions.create(model=CHAT, messages=messages, max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    expected["prompt_tokens"] += plain.usage.prompt_tokens  # the same request: the engine counts it the same
    expected["completion_tokens"] += plain.usage.completion_tokens
    with_usage = list(
        api.chat.completions.create(
            model=CHAT, messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    final = with_usage[-1].usage
    assert final is not None and not with_usage[-1].choices
    expected["prompt_tokens"] += final.prompt_tokens
    expected["completion_tokens"] += final.completion_tokens
    vectors = other.embeddings.create(model=EMBED, input=["a b c", "d e"])
    expected["embedding_tokens"] += vectors.usage.prompt_tokens
    expected["requests"] = 4

    # on a Redis Cluster each job's accounting (its request and tokens, one script) runs just after its answer
    wait_for(lambda: _usage_totals(fleet, key)["requests"] == 4, what="the four requests' usage counted")
    rows = fleet.cli_json("usage", key["id"])
    assert _summed(rows) == expected
    assert {row["model"] for row in rows} == {CHAT, EMBED} and {row["key_name"] for row in rows} == {key["name"]}
    assert _usage_totals(fleet, key) == expected
    tokens = sum(
        metric(worker.metrics(), "conveyor_key_tokens_total", key=key["name"]) for worker in fleet.workers.values()
    )
    assert tokens == expected["prompt_tokens"] + expected["completion_tokens"] + expected["embedding_tokens"]


def _batch_input(model: str, lines: int, words: int) -> bytes:
    text = " ".join(["word"] * words)
    return "".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                    "body": {"model": model, "input": text}}) + "\n"
        for i in range(lines)
    ).encode()  # fmt: skip


def metered_batch(fleet: Fleet) -> tuple[dict[str, Any], openai.OpenAI, Batch]:
    """A 1,000-tpm key's batch of 12 lines of 80 words (100 estimated tokens each), once the 8 lines its batch share
    lets go are done: the key, its client and the batch."""
    key = new_key(fleet, "--tpm", "1000")
    api = client(fleet, key["value"])
    upload = api.files.create(file=("in.jsonl", io.BytesIO(_batch_input(EMBED, 12, 80))), purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(
        lambda: api.batches.retrieve(batch.id).request_counts.completed == 8,  # type: ignore[union-attr]
        timeout=30,
        what="the chunks the key's tokens allow",
    )
    return key, api, batch


def test_batch_lines_count_against_the_keys_tokens_and_leave_room_for_its_requests(fleet: Fleet) -> None:
    """Lines of 100 estimated tokens under a 1,000-tpm key whose batches may fill 80%: chunks are cut at a quarter of
    that (200 tokens: 2 lines, not the 4 the gateway's chunk size allows), four go (800), the fifth waits for the
    window, and the key's interactive requests still fit beside them."""
    key, api, batch = metered_batch(fleet)
    assert api.batches.retrieve(batch.id).status == "in_progress"
    with sync_redis(fleet.redis_url) as store:
        plan = json.loads(store.hget(key_layout.batch_key(batch.id), "plan") or "[]")
    assert [(chunk["lines"], chunk["tokens"]) for chunk in plan] == [(2, 200)] * 6
    # the four chunks were reconciled to the engine's count (80 words a line): 640 of 1,000 used
    room = api.embeddings.with_raw_response.create(model=EMBED, input=list(range(1, 301)))
    assert int(room.headers["x-ratelimit-remaining-tokens"]) == 1000 - 640 - 300
    fleet.cli_json("update", key["id"], "--tpm", "5000")
    wait_for(lambda: api.batches.retrieve(batch.id).status == "completed", timeout=30, what="the batch")
    rows = fleet.cli_json("usage", key["id"])
    assert sum(r["requests"] for r in rows) == 12 + 1
    assert sum(r["embedding_tokens"] for r in rows) == 12 * 80 + 300


def test_the_admin_api_creates_updates_and_refuses_clearly(fleet: Fleet) -> None:
    with fleet.admin() as admin:
        created = admin.post("/admin/keys", json={"name": "admin-made", "rpm": 5, "models": [CHAT]})
        assert created.status_code == 201, created.text
        key = created.json()
        assert key["value"].startswith("sk-cv-") and "value" not in admin.get(f"/admin/keys/{key['id']}").json()
        taken = admin.post("/admin/keys", json={"name": "admin-made"})
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "key_name_taken"
        bad = admin.post("/admin/keys", json={"name": "admin-made-2", "rpm": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
        weightless = admin.post("/admin/keys", json={"name": "admin-made-2", "weight": 0})
        assert weightless.status_code == 400 and weightless.json()["error"]["param"] == "weight"
        assert admin.patch(f"/admin/keys/{key['id']}", json={"weight": 3}).json()["weight"] == 3
        changed = admin.patch(f"/admin/keys/{key['id']}", json={"rpm": None, "tpm": 70})
        assert (changed.json()["rpm"], changed.json()["tpm"]) == (None, 70)
        assert admin.get("/admin/keys/key_missing").status_code == 404
    wrong = httpx.get(f"{fleet.gateways[0].base_url}/admin/keys", headers={"Authorization": "Bearer nope-nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):  # the admin key is not an API key
        client(fleet, "admin-key-for-tests").models.list()


def test_a_keys_files_and_batches_are_its_own(fleet: Fleet) -> None:
    owner, other = client(fleet, new_key(fleet)["value"]), client(fleet, new_key(fleet)["value"], 1)
    operator = client(fleet, STATIC_KEY)
    upload = owner.files.create(file=("in.jsonl", io.BytesIO(_batch_input(EMBED, 2, 3))), purpose="batch")
    batch = owner.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert upload.id in {f.id for f in owner.files.list()} and batch.id in {b.id for b in owner.batches.list()}
    assert upload.id not in {f.id for f in other.files.list()} and batch.id not in {b.id for b in other.batches.list()}
    for denied in (
        lambda: other.files.retrieve(upload.id),
        lambda: other.files.content(upload.id),
        lambda: other.files.delete(upload.id),
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            denied()
    wait_for(lambda: owner.batches.retrieve(batch.id).status == "completed", timeout=30, what="the batch")
    output = owner.batches.retrieve(batch.id).output_file_id
    assert output is not None and len(owner.files.content(output).text.splitlines()) == 2
    with pytest.raises(openai.NotFoundError):
        other.files.content(output)
    assert operator.batches.retrieve(batch.id).id == batch.id  # a static key sees every tenant's work


def test_a_revoked_keys_batch_releases_nothing_more_and_is_cancelled(fleet: Fleet) -> None:
    key, _, batch = metered_batch(fleet)
    fleet.cli_json("revoke", key["id"])
    operator = client(fleet, STATIC_KEY)  # the revoked key itself can no longer look
    wait_for(lambda: operator.batches.retrieve(batch.id).status == "cancelled", timeout=30, what="the cancel")
    final = operator.batches.retrieve(batch.id)
    assert final.request_counts is not None and final.request_counts.completed == 8
    errors = operator.files.content(final.error_file_id or "").text.splitlines()
    assert len(errors) == 4 and all("batch_cancelled" in line for line in errors)
