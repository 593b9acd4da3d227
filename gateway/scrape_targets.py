"""Prometheus HTTP service discovery from the registry: ``GET /internal/scrape-targets?role=gateway|worker``.

Every gateway advertises its own scrape address in Redis (renewed every few seconds, removed on shutdown) and every
worker its metrics address (in its registry entry, loading or serving), so a Prometheus pointed at any gateway finds
all of them by itself (``deploy/prometheus/prometheus.yml``). The answer is Prometheus's HTTP SD format: a list of
``{"targets": ["host:port"], "labels": {...}}``. Like ``/metrics``, this is for the cluster network, not the public.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from redis.asyncio import Redis

from conveyor import registry
from conveyor.netaddr import host_port
from conveyor.outage import REDIS_DOWN
from gateway.queue import redis_errors

#: a gateway renews its presence this often; it lapses after three missed renewals
PRESENCE_SECONDS = 5.0

targets = APIRouter()


@targets.get("/internal/scrape-targets")
async def scrape_targets(request: Request, role: Literal["gateway", "worker"] = Query(...)) -> list[dict[str, Any]]:
    redis: Redis = request.app.state.redis
    with redis_errors():
        if role == "gateway":
            return [{"targets": [address], "labels": {}} for address in await registry.live_gateways(redis)]
        workers = await registry.all_workers(redis)
    return [
        {"targets": [host_port(w.address or w.host, w.metrics_port)], "labels": {"worker_id": w.worker_id}}
        for w in workers
        if w.metrics_port
    ]


async def advertise(redis: Redis, address: str) -> None:
    """Renew this gateway's scrape address in the registry (Redis down: /ready and the requests report that)."""
    with contextlib.suppress(*REDIS_DOWN):
        await registry.gateway_heartbeat(redis, address, ttl=3 * PRESENCE_SECONDS)


async def advertise_forever(redis: Redis, address: str) -> None:
    """Keep this gateway's scrape address in the registry while it runs (``leave`` removes it)."""
    while True:
        await asyncio.sleep(PRESENCE_SECONDS)
        await advertise(redis, address)


async def leave(redis: Redis, address: str) -> None:
    """Remove this gateway's scrape address as it stops (called by the lifespan itself: a task cancelled before it
    first ran would never reach a ``finally`` of its own)."""
    with contextlib.suppress(*REDIS_DOWN):
        await registry.gateway_leave(redis, address)
