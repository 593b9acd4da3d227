"""Cancellation, limits, deadlines, scaling and shutdown, through real processes."""

from __future__ import annotations

import asyncio
import signal

import httpx
import openai
import pytest

from launcher import redis_server
from tests.conftest import Processes, Worker, metric, queue_depth, wait_for

MESSAGES = [{"role": "user", "content": "tell me a long story"}]
SLOW = ("--fake-token-delay", "0.05")  # 20 tokens/s: 400 tokens take 20 s


def live_models(base_url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{base_url}/v1/models").json()["data"] if m["status"] == "serving"]


def engine_idle(worker: Worker) -> bool:
    return metric(worker.metrics(), "conveyor_worker_engine_running_requests") == 0


def cancelled_jobs(worker: Worker) -> float:
    return metric(worker.metrics(), "conveyor_worker_jobs_total", outcome="cancelled")


def running_jobs(worker: Worker) -> float:
    return metric(worker.metrics(), "conveyor_worker_running_jobs")


def test_dropped_stream_cancels_the_job_in_the_engine(spawn: Processes) -> None:
    gateway = spawn.gateway()
    worker = spawn.fake_worker("slow-stream", *SLOW)
    body = {"model": "slow-stream", "messages": MESSAGES, "max_tokens": 400, "stream": True}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        wait_for(lambda: running_jobs(worker) == 1, what="the job to run")
    # the client hung up after the first chunk: the job must end as cancelled long before its 20 s
    wait_for(lambda: cancelled_jobs(worker) == 1, what="the job to be cancelled")
    wait_for(lambda: running_jobs(worker) == 0, what="no running job")
    assert metric(worker.metrics(), "conveyor_worker_jobs_total", outcome="ok") == 0


def test_dropped_sync_request_cancels_the_job(spawn: Processes) -> None:
    gateway = spawn.gateway()
    worker = spawn.fake_worker("slow-sync", *SLOW)
    body = {"model": "slow-sync", "messages": MESSAGES, "max_tokens": 400}

    async def call_then_hang_up() -> None:
        async with httpx.AsyncClient() as client:
            request = asyncio.create_task(client.post(f"{gateway.base_url}/v1/chat/completions", json=body, timeout=30))
            await asyncio.to_thread(wait_for, lambda: running_jobs(worker) == 1, 10.0, "the job to run")
            request.cancel()  # closes the connection mid-request
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(call_then_hang_up())
    wait_for(lambda: cancelled_jobs(worker) == 1, what="the job to be cancelled")
    assert metric(worker.metrics(), "conveyor_worker_jobs_total", outcome="ok") == 0


def test_full_queue_answers_429_with_retry_after(spawn: Processes) -> None:
    gateway = spawn.gateway(max_queue_depth="2", retry_after_seconds="3")
    worker = spawn.fake_worker("tiny-queue", *SLOW, "--max-jobs", "1")
    body = {"model": "tiny-queue", "messages": MESSAGES, "max_tokens": 400}

    async def fill_then_overflow() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{gateway.base_url}/v1/chat/completions"
            first = asyncio.create_task(client.post(url, json=body))
            await asyncio.to_thread(wait_for, lambda: running_jobs(worker) == 1, 10.0, "the first job to run")
            second = asyncio.create_task(client.post(url, json=body))
            await asyncio.to_thread(
                wait_for, lambda: queue_depth(spawn.redis_url, "tiny-queue") == 2, 10.0, "the second job to queue"
            )
            sdk = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0)
            try:
                # one job runs and one waits: depth 2 = the limit, so the next one is refused
                with pytest.raises(openai.RateLimitError) as caught:
                    await sdk.chat.completions.create(model="tiny-queue", messages=MESSAGES, max_tokens=1)
                assert caught.value.response.headers["retry-after"] == "3"
                assert caught.value.code == "queue_full"
            finally:
                await sdk.close()
                first.cancel()
                second.cancel()

    asyncio.run(asyncio.wait_for(fill_then_overflow(), 20))


def test_deadline_answers_504_and_stops_the_job(spawn: Processes) -> None:
    gateway = spawn.gateway()
    worker = spawn.fake_worker("deadline", *SLOW)
    client = gateway.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="deadline", messages=MESSAGES, max_tokens=400, extra_headers={"X-Conveyor-Timeout": "0.5"}
        )
    assert caught.value.status_code == 504
    assert caught.value.code == "deadline_exceeded"
    wait_for(lambda: running_jobs(worker) == 0 and engine_idle(worker), what="the job to stop")


def test_two_workers_on_one_queue_both_serve(spawn: Processes) -> None:
    gateway = spawn.gateway()
    workers = [spawn.fake_worker("pair", "--fake-token-delay", "0.02", "--max-jobs", "2") for _ in range(2)]

    async def burst() -> None:
        sdk = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0)
        try:
            await asyncio.gather(
                *(sdk.chat.completions.create(model="pair", messages=MESSAGES, max_tokens=20) for _ in range(8))
            )
        finally:
            await sdk.close()

    asyncio.run(burst())
    served = [metric(w.metrics(), "conveyor_worker_jobs_total", outcome="ok") for w in workers]
    assert sum(served) == 8
    assert all(count > 0 for count in served), served


def test_sigterm_leaves_the_registry_finishes_the_running_job_then_exits(spawn: Processes) -> None:
    gateway = spawn.gateway(models="graceful")
    worker = spawn.fake_worker("graceful", "--fake-token-delay", "0.02")  # 300 tokens: ~6 s

    async def request_then_terminate() -> str | None:
        sdk = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0)
        try:
            call = asyncio.create_task(sdk.chat.completions.create(model="graceful", messages=MESSAGES, max_tokens=300))
            await asyncio.to_thread(wait_for, lambda: running_jobs(worker) == 1, 10.0, "the job to run")
            worker.process.send_signal(signal.SIGTERM)
            # no new work is routed to a draining worker: with no other worker, new requests are refused at once
            await asyncio.to_thread(
                wait_for, lambda: "graceful" not in live_models(gateway.base_url), 3.0, "the worker to leave"
            )
            with pytest.raises(openai.InternalServerError) as refused:
                await sdk.chat.completions.create(model="graceful", messages=MESSAGES, max_tokens=1)
            assert refused.value.code == "no_live_worker"
            return (await call).choices[0].message.content
        finally:
            await sdk.close()

    text = asyncio.run(request_then_terminate())
    assert text is not None and len(text.split()) == 300
    assert worker.process.wait(30) == 0


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_redis_down_is_503_not_500(spawn: Processes, scheme: str) -> None:
    """Also a Redis Cluster none of whose nodes answers (redis-py raises no RedisError while it looks for the slot
    map): the gateway starts, waits for it and says so."""
    spawn.redis_url = f"{scheme}://127.0.0.1:{redis_server.free_port()}"  # nothing listens there
    gateway = spawn.gateway(models="anything", env={"CONVEYOR_QUEUE_BACKEND": "streams"})
    with pytest.raises(openai.InternalServerError) as caught:
        gateway.client(timeout=10).chat.completions.create(model="anything", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.code == "redis_unavailable"
    assert httpx.get(f"{gateway.base_url}/ready").status_code == 503


def test_api_keys_are_enforced(spawn: Processes) -> None:
    gateway = spawn.gateway(api_keys="sk-test-0123456789")
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key="wrong-key-123").models.list()
    assert gateway.client(api_key="sk-test-0123456789").models.list().data is not None
