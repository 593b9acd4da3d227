"""A worker process: one engine, one model's arq queue, a heartbeat in the registry, its own /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

import uvloop
from arq.worker import func
from prometheus_client import start_http_server
from redis.asyncio import Redis

from conveyor import contract, redis_client, registry
from worker import metrics, wakeup
from worker.engines.base import Engine
from worker.jobs import JobRunner
from worker.settings import WorkerSettings
from worker.wakeup import WakeableWorker

log = logging.getLogger("conveyor.worker")


def build_engine(settings: WorkerSettings) -> Engine:
    if settings.engine == "fake":
        from worker.engines.fake import FakeEngine

        return FakeEngine(
            settings.model,
            embed=settings.task == "embed",
            token_delay=settings.fake_token_delay,
            embedding_dim=settings.fake_embedding_dim,
            concurrency=settings.max_jobs or 64,
        )
    from worker.engines.vllm_engine import VLLMEngine

    return VLLMEngine(settings)


async def _heartbeat_forever(redis: Redis, info: registry.WorkerInfo, settings: WorkerSettings) -> None:
    ttl = settings.heartbeat_interval * 3
    while True:
        try:
            await registry.heartbeat(redis, info, ttl)
        except Exception:  # Redis blips must not kill the worker; the next beat retries
            log.warning("heartbeat failed", exc_info=True)
        await asyncio.sleep(settings.heartbeat_interval)


async def serve(settings: WorkerSettings) -> None:
    if not settings.log_jobs:
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
    engine = build_engine(settings)
    log.info("loading %s engine for model %s", settings.engine, settings.model)
    await engine.start()
    server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    max_jobs = settings.max_jobs or engine.concurrency
    info = registry.WorkerInfo(
        worker_id=settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        model=settings.model,
        capabilities=sorted(engine.capabilities),
        max_model_len=engine.max_model_len,
        max_jobs=max_jobs,
        host=socket.gethostname(),
        pid=os.getpid(),
        metrics_port=server.server_port,
        started=time.time(),
    )
    redis = redis_client.connect(settings.redis_url)
    runner = JobRunner(redis, engine, settings.model)
    worker = WakeableWorker(
        functions=[func(runner.job, name=contract.JOB_FUNCTION)],
        queue_name=contract.queue_name(settings.model),
        redis_pool=redis,
        max_jobs=max_jobs,
        idle_poll_delay=settings.poll_delay,
        job_timeout=settings.job_timeout,
        keep_result=0,
        allow_abort_jobs=True,
        job_completion_wait=settings.grace_period,
        job_serializer=contract.dumps,
        job_deserializer=contract.loads,
        max_tries=3,
        handle_signals=True,
    )
    metrics.ENGINE_RUNNING.labels(settings.model).set_function(engine.running_requests)
    heartbeat = asyncio.create_task(_heartbeat_forever(redis, info, settings))
    leaving: list[asyncio.Task[None]] = []

    def drain() -> None:  # stop advertising this worker while its last jobs finish
        heartbeat.cancel()
        leaving.append(asyncio.create_task(registry.deregister(redis, info)))

    worker.on_drain = drain
    wakeups = asyncio.create_task(wakeup.listen(redis, contract.wake_channel(settings.model), worker))
    log.info(
        "worker %s serving %s on %s (max_jobs=%d, metrics on :%d)",
        info.worker_id,
        settings.model,
        contract.queue_name(settings.model),
        max_jobs,
        server.server_port,
    )
    print(
        f"conveyor worker ready: model={settings.model} worker_id={info.worker_id} metrics_port={server.server_port}",
        flush=True,
    )
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        heartbeat.cancel()
        wakeups.cancel()
        await asyncio.gather(*leaving, return_exceptions=True)
        await runner.publisher.close()
        with contextlib.suppress(Exception):
            await registry.deregister(redis, info)
        await redis_client.close(redis)
        server.shutdown()
        await engine.stop()
        log.info("worker %s stopped", info.worker_id)


def run(settings: WorkerSettings) -> None:
    # uvloop, as vLLM's own server and uvicorn use: the worker's event loop spends most of its time writing to Redis
    uvloop.run(serve(settings))
