"""A worker process: one engine, one model's queue, a heartbeat in the registry, its own /metrics.

The worker registers as loading before its engine loads (its /metrics answer from the start), as serving once the
engine is up, and leaves the registry at once when it drains (SIGTERM) or when its engine dies or hangs; then it
exits non-zero, so its supervisor restarts it. Redis outages are ridden out (``conveyor.outage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid

import uvloop
from redis.asyncio import Redis

from conveyor import gc_tuning, redis_client, registry
from conveyor.filestore import open_store
from conveyor.netaddr import address_towards
from conveyor.outage import REDIS_DOWN, Outage
from worker import http_endpoints, metrics
from worker.consumer import Consumer
from worker.embed_batcher import EmbeddingBatcher
from worker.engine_share import EngineShare
from worker.engines.base import Engine
from worker.jobs import JobRunner
from worker.migration import Migration
from worker.queue_backends import open_source
from worker.settings import WorkerSettings

log = logging.getLogger("conveyor.worker")

#: exit codes a supervisor can tell apart
EXIT_ENGINE_FAILED = 3


def build_engine(settings: WorkerSettings) -> Engine:
    if settings.engine == "fake":
        from worker.engines.fake import FakeEngine

        return FakeEngine(
            settings.model,
            embed=settings.task == "embed",
            token_delay=settings.fake_token_delay,
            embedding_dim=settings.fake_embedding_dim,
            concurrency=settings.max_jobs or 64,
            cpu_per_input=settings.fake_cpu_per_input,
        )
    from worker.engines.vllm_engine import VLLMEngine

    return VLLMEngine(settings)


class Heartbeat:
    """Keeps this worker's registry entry alive; beats at once after a Redis outage (the registry may be empty)."""

    def __init__(self, redis: Redis, info: registry.WorkerInfo, interval: float, outage: Outage) -> None:
        self.redis = redis
        self.info = info
        self.interval = interval
        self.outage = outage
        self.now = asyncio.Event()
        #: cleared when the worker leaves the registry (drain, failure): it must not re-appear
        self.active = True
        outage.on_recovery(self.now.set)

    async def beat_forever(self) -> None:
        delay = self.interval
        while self.active:
            self.now.clear()
            try:
                await registry.heartbeat(self.redis, self.info, self.interval * 3)
                self.outage.ok()
                delay = self.interval
            except REDIS_DOWN as exc:
                delay = self.outage.failed(exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.now.wait()

    async def leave(self, reason: registry.FailureReason | None = None) -> None:
        """Stop beating and leave the registry now (a drain, or an engine failure whose reason the model's status
        then shows). Without Redis the entry expires on its own."""
        self.active = False
        failure = registry.Failure(worker_id=self.info.worker_id, reason=reason, at=time.time()) if reason else None
        with contextlib.suppress(*REDIS_DOWN):
            await registry.deregister(self.redis, self.info, failure)


async def watch_engine(engine: Engine, consumer: Consumer, settings: WorkerSettings) -> registry.FailureReason:
    """Returns when the engine is dead, or has made no progress for ``engine_stall_timeout`` seconds while it had
    work."""
    progress, since = engine.progress(), time.monotonic()
    while True:
        await asyncio.sleep(settings.engine_check_interval)
        if consumer.engine_dead or not engine.alive():
            return "engine_dead"
        now = engine.progress()
        if now != progress or consumer.running == 0:
            progress, since = now, time.monotonic()
        elif time.monotonic() - since > settings.engine_stall_timeout:
            return "engine_stalled"


async def serve(settings: WorkerSettings) -> int:
    """Run until drained (0) or until the engine fails (``EXIT_ENGINE_FAILED``)."""
    if not settings.worker_id:
        settings.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    engine = build_engine(settings)
    info = registry.WorkerInfo(
        worker_id=settings.worker_id,
        model=settings.model,
        state="loading",
        capabilities=[],
        max_jobs=settings.max_jobs,
        host=socket.gethostname(),
        address=settings.advertise_host or address_towards(settings.redis_url),
        pid=os.getpid(),
        started=time.time(),
        queue_backend=settings.queue_backend,
    )
    failed = threading.Event()
    server = http_endpoints.serve(
        settings.metrics_host, settings.metrics_port, lambda: "failed" if failed.is_set() else info.state
    )
    info.metrics_port = server.server_port
    redis = redis_client.connect(settings.redis_url)
    outage = Outage(log, f"worker {info.worker_id}")
    heartbeat = Heartbeat(redis, info, settings.heartbeat_interval, outage)
    beating = asyncio.create_task(heartbeat.beat_forever(), name="heartbeat")
    try:
        code = await _serve_engine(settings, engine, redis, info, heartbeat, outage)
        if code == EXIT_ENGINE_FAILED:
            failed.set()
        return code
    finally:
        beating.cancel()
        await heartbeat.leave()
        await redis_client.close(redis)
        server.shutdown()
        server.server_close()
        await engine.stop()
        log.info("worker %s stopped", info.worker_id)


async def _serve_engine(
    settings: WorkerSettings,
    engine: Engine,
    redis: Redis,
    info: registry.WorkerInfo,
    heartbeat: Heartbeat,
    outage: Outage,
) -> int:
    log.info("loading %s engine for model %s", settings.engine, settings.model)
    try:
        await engine.start()
    except Exception:
        log.exception("the engine for %s failed to start", settings.model)
        await heartbeat.leave("engine_start_failed")
        return EXIT_ENGINE_FAILED
    gc_tuning.settle()  # the engine is loaded: its objects need no more walks by the collector
    info.max_jobs = settings.max_jobs or engine.concurrency
    info.capabilities = sorted(engine.capabilities)
    info.max_model_len = engine.max_model_len
    info.state = "serving"
    heartbeat.now.set()
    runner = JobRunner(
        redis,
        engine,
        settings.model,
        max_tries=settings.max_tries,
        store=open_store(settings.files_url),
        share=EngineShare(settings.bulk_busy_inputs),
        batcher=EmbeddingBatcher(engine, settings.model, settings.embed_batch_wait, settings.embed_batch_max_inputs),
        migration=Migration(redis, settings.model, settings.migrate, settings.max_migrations),
    )
    source = open_source(settings.queue_backend, redis, settings.model, info.worker_id, settings.lease_seconds)
    consumer = Consumer(
        source,
        runner.job,
        max_jobs=info.max_jobs,
        poll_delay=settings.poll_delay,
        renew_interval=settings.lease_seconds / 3,
        outage=outage,
        bulk_jobs=settings.bulk_jobs,
    )
    metrics.ENGINE_RUNNING.labels(settings.model).set_function(engine.running_requests)
    for outcome in ("resumed", "refused"):  # exported from the start: a rate of 0 until the first migration
        metrics.MIGRATIONS.labels(settings.model, outcome)
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if draining:
            return
        log.info("%s: leaving the registry and draining", signal.Signals(signum).name)
        draining.append(loop.create_task(_leave_and_drain(heartbeat, consumer, settings.grace_period)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watchdog = asyncio.create_task(watch_engine(engine, consumer, settings), name="engine-watchdog")
    serving = asyncio.create_task(consumer.run(), name="consumer")
    log.info(
        "worker %s serving %s (max_jobs=%d, metrics on :%d)",
        info.worker_id,
        info.model,
        info.max_jobs,
        info.metrics_port,
    )
    try:
        await asyncio.wait({watchdog, serving}, return_when=asyncio.FIRST_COMPLETED)
        if not watchdog.done() and not consumer.engine_dead:
            return 0  # drained
        # a job may have seen the engine die before the watchdog's next look
        reason = watchdog.result() if watchdog.done() else "engine_dead"
        log.error("engine failure (%s): leaving the registry, handing jobs back, exiting", reason)
        await heartbeat.leave(reason)
        consumer.fail()
        await serving
        return EXIT_ENGINE_FAILED
    finally:
        watchdog.cancel()
        serving.cancel()
        await runner.migration.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _leave_and_drain(heartbeat: Heartbeat, consumer: Consumer, grace: float) -> None:
    await heartbeat.leave()
    await consumer.drain(grace)


def run(settings: WorkerSettings) -> int:
    # uvloop, as vLLM's own server and uvicorn use: the worker's event loop spends most of its time writing to Redis
    return uvloop.run(serve(settings))
