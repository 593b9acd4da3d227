"""Redis outages, killed workers and dead or hung engines, against real processes. Every wait is bounded; the times
printed are measurements, not asserted (the README's outage table comes from ``bench/faults.py``, whose 5 s case
runs here as a test)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from bench import faults
from conveyor.contract import QueueBackend
from tests.conftest import Processes, metric, wait_for

MODEL = "faulty"
MESSAGES = [{"role": "user", "content": "tell me a story"}]
FAST_FAILURE = {"CONVEYOR_WORKER_ENGINE_CHECK_INTERVAL": "0.2", "CONVEYOR_WORKER_ENGINE_STALL_TIMEOUT": "1.5"}


@pytest.mark.parametrize("persist", [False, True], ids=["no-persistence", "aof"])
def test_workers_ride_out_a_redis_outage_and_lose_no_job(queue_backend: QueueBackend, persist: bool) -> None:
    result = faults.outage_on_a_fresh_stack(5, persist)
    print(f"serving again {result.serving_again_after:.2f} s after Redis returned")
    assert result.worker_exits == 0
    assert result.words_answered == result.words_asked  # the job held through the outage was answered in full


def test_a_killed_workers_jobs_are_answered_by_the_other_and_its_stream_goes_on_there(procs: Processes) -> None:
    gateway = procs.gateway(models=MODEL)
    workers = [procs.fake_worker(MODEL, "--fake-token-delay", "0.05", "--max-jobs", "4") for _ in range(2)]

    def running(worker_index: int) -> float:
        return metric(workers[worker_index].metrics(), "conveyor_worker_running_jobs")

    async def kill_one_while_busy() -> tuple[list[int], int, float]:
        sdk = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        try:
            calls = [
                asyncio.create_task(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60))
                for _ in range(6)
            ]
            stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=400, stream=True)
            chunks = 0
            async for _ in stream:  # the first chunks arrive: now kill whichever worker runs the stream, mid-stream
                chunks += 1
                if chunks == 3:
                    break
            await asyncio.to_thread(wait_for, lambda: running(0) + running(1) == 7, 10.0, "all jobs running")
            victim = next(w for w in workers if metric(w.metrics(), "conveyor_worker_stream_messages_total") > 0)
            victim.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            async for chunk in stream:  # continued on the other worker (tests/faults/test_migration.py)
                chunks += bool(chunk.choices and chunk.choices[0].delta.content)
            ended_after = time.monotonic() - killed
            answers = await asyncio.gather(*calls)
            return [len((a.choices[0].message.content or "").split()) for a in answers], chunks, ended_after
        finally:
            await sdk.close()

    lengths, chunks, ended_after = asyncio.run(kill_one_while_busy())
    assert lengths == [60] * 6  # every sync request answered, in full, exactly once
    assert chunks == 401  # the role chunk, then every one of its 400 tokens once
    print(f"the stream ended {ended_after:.1f} s after the SIGKILL")


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_dead_or_hung_engine_takes_its_worker_out_and_its_job_runs_elsewhere(procs: Processes, fault: str) -> None:
    gateway = procs.gateway(models=MODEL)
    sick = procs.fake_worker(MODEL, "--fake-token-delay", "0.02", env=FAST_FAILURE)
    client = gateway.client(timeout=30)
    with pytest.raises(openai.APIError):  # the request that breaks the engine: handed back, tried again, refused
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=5,
            extra_body={"fake_fault": fault},
            extra_headers={"x-conveyor-timeout": "8"},
        )
    assert sick.process.wait(20) == 3  # exits non-zero, so its supervisor restarts it
    card = httpx.get(f"{gateway.base_url}/v1/models/{MODEL}").json()
    assert card["status"] == "failed" and card["failure"] == ("engine_dead" if fault == "die" else "engine_stalled")
    assert httpx.get(f"{gateway.base_url}/ready").json()["models"][MODEL]["status"] == "failed"
    healthy = procs.fake_worker(MODEL)
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert len((answer.choices[0].message.content or "").split()) == 3
    assert metric(healthy.metrics(), "conveyor_worker_jobs_total", outcome="ok") >= 1
