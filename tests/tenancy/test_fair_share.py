"""Fair share between API keys on a busy model, through real gateways, a real worker and the official SDK: a key that
floods a model's queue does not hold back a key that comes after it, and still gets every slot the other leaves.
Also the request's ``priority`` as the SDK sends it (``extra_body``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from launcher.redis_cluster import RedisClusterServer
from launcher.redis_server import RedisServer
from tests.conftest import Processes, metric, scrape, wait_for
from tests.tenancy.conftest import ADMIN_KEY, Fleet

MODEL = "tenant-fair"
#: the worker's slots, and each job's time in the fake engine (tokens x delay): 80 jobs/s, slower than a client sends
SLOTS, TOKENS, TOKEN_DELAY = 8, 5, 0.02
FLOOD, PROBES = 1000, 10
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fair_fleet(tenancy_redis: RedisServer | RedisClusterServer) -> Iterator[Fleet]:
    procs = Processes(tenancy_redis.url, env={"CONVEYOR_ADMIN_KEY": ADMIN_KEY})
    gateways = [procs.gateway(models=MODEL), procs.gateway(models=MODEL)]
    delay = str(TOKEN_DELAY)
    worker = procs.fake_worker(MODEL, "--fake-token-delay", delay, "--max-jobs", str(SLOTS))
    yield Fleet(tenancy_redis.url, gateways, {MODEL: worker})
    procs.stop_all()


def new_key(fleet: Fleet, *flags: str) -> str:
    created: dict[str, Any] = fleet.cli_json("create", "--name", f"fair-{uuid.uuid4().hex[:8]}", *flags)
    return str(created["value"])


async def post(port: int, key: str, body: bytes) -> int:
    """One request of A's load on its own connection: plain HTTP/1.1 over a socket, so that a thousand open at once
    cost the test's client next to nothing (an HTTP client library's pool of a thousand connections keeps a core
    busy, and B's measurements would be of that). Returns the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    try:
        status = int((await reader.readline()).split()[1])
        await reader.read()  # to the end: the server closes
        return status
    finally:
        writer.close()


async def one_at_a_time(probe: openai.AsyncOpenAI, count: int) -> list[float]:
    """The latency of ``count`` requests sent one after another, as one interactive user would."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await probe.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=TOKENS)  # type: ignore[arg-type]
        latencies.append(time.perf_counter() - started)
    return latencies


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def queued(fleet: Fleet) -> float:
    return metric(scrape(f"{fleet.gateways[0].base_url}/metrics"), "conveyor_queue_depth", model=MODEL)


async def flood_then_probe(fleet: Fleet, flooder: str, prober: str) -> tuple[list[float], list[float], int, int, int]:
    """B's latencies alone, then A's flood and B's latencies behind it; A's completions while B was served, A's
    requests still unanswered when B was done, and how many of A's failed."""
    probe_url = f"{fleet.gateways[1].base_url}/v1"
    async with openai.AsyncOpenAI(base_url=probe_url, api_key=prober, max_retries=0) as probe:
        idle = await one_at_a_time(probe, PROBES)
        # A's jobs vary in length (1 to 9 tokens, TOKENS on average) as real ones do, so slots free one at a time
        bodies = [{"model": MODEL, "messages": MESSAGES, "max_tokens": 1 + i % (2 * TOKENS - 1)} for i in range(FLOOD)]
        port = fleet.gateways[0].port
        flood = [asyncio.create_task(post(port, flooder, json.dumps(body).encode())) for body in bodies]

        def all_in() -> bool:  # every one of A's requests is in the queue or answered: the client is quiet again
            return queued(fleet) + sum(task.done() for task in flood) >= FLOOD

        await asyncio.to_thread(wait_for, all_in, 120, "A's flood in the queue")
        done_before = sum(task.done() for task in flood)
        busy = await one_at_a_time(probe, PROBES)
        done_during = sum(task.done() for task in flood) - done_before
        left = FLOOD - sum(task.done() for task in flood)
        results = await asyncio.gather(*flood, return_exceptions=True)
    failed = sum(result != 200 for result in results)
    return idle, busy, done_during, left, failed


def test_a_key_behind_a_flood_waits_about_as_long_as_on_an_idle_model(fair_fleet: Fleet) -> None:
    flooder, prober = new_key(fair_fleet), new_key(fair_fleet)
    idle, busy, done_during, left, failed = asyncio.run(flood_then_probe(fair_fleet, flooder, prober))
    print(
        f"\nB alone p95 {p95(idle) * 1000:.0f} ms; behind A's flood p95 {p95(busy) * 1000:.0f} ms; "
        f"A answered {done_during} while B was served, {left} still waiting after"
    )
    assert left > SLOTS, "A's flood drained before B was done: B was not measured behind it"
    # first come, first served would keep B behind hundreds of A's jobs (seconds); fair order lets B in at once
    assert p95(busy) <= 2 * p95(idle)
    # B used one slot at a time: A kept the others busy (at least half of what they could do meanwhile)
    assert done_during >= (SLOTS - 1) * sum(busy) / (TOKENS * TOKEN_DELAY) / 2
    assert failed == 0


def test_priority_is_taken_as_vllm_takes_it(fair_fleet: Fleet) -> None:
    sdk = fair_fleet.gateways[0].client(api_key=new_key(fair_fleet))
    answer = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"priority": -3})  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    for bad in (1.5, "high", True):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"priority": bad})  # type: ignore[arg-type]
        assert refused.value.param == "priority"


def test_a_keys_weight_is_set_and_removed_with_the_cli(fair_fleet: Fleet) -> None:
    name = f"weighted-{uuid.uuid4().hex[:8]}"
    assert fair_fleet.cli_json("create", "--name", name, "--weight", "2.5")["weight"] == 2.5
    assert fair_fleet.cli_json("update", name, "--weight", "none")["weight"] is None  # the default, 1
    refused = fair_fleet.cli("update", name, "--weight", "0")
    assert refused.returncode != 0 and "above 0" in refused.stderr
