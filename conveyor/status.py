"""``conveyor status``: what the registry in Redis says now: models, workers, queue depths, running batches."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from redis.asyncio import Redis

from conveyor import key_layout, redis_client, registry
from conveyor.fleet import FleetStore
from conveyor.outage import REDIS_DOWN


async def snapshot(redis: Redis) -> dict[str, Any]:
    """Models (state, workers, queued jobs, queued batch chunks), workers, gateways and unfinished batches."""
    models = {}
    fleet = FleetStore(redis)
    runs = await fleet.runs()
    for name in sorted(await registry.known_models(redis) | set(await fleet.specs())):
        status = await registry.model_status(redis, name)
        run = runs.get(name)
        models[name] = {
            "state": status.state,
            "workers": status.live_workers,
            "loading": status.loading_workers,
            "queued": status.queue_depth,
            "bulk_queued": status.bulk_depth,
            "fleet": run.model_dump() if run else None,
        }
    batches = []
    for raw in sorted(await cast(Any, redis.smembers(key_layout.ACTIVE_BATCHES))):
        batch_id = raw.decode() if isinstance(raw, bytes) else raw
        record = await cast(Any, redis.hgetall(key_layout.batch_key(batch_id)))
        fields = {k.decode(): v.decode() for k, v in record.items()}
        batches.append({"id": batch_id, **{k: fields.get(k, "") for k in ("status", "completed", "failed", "total")}})
    return {
        "models": models,
        "workers": [w.model_dump() for w in sorted(await registry.all_workers(redis), key=lambda w: w.worker_id)],
        "gateways": await registry.live_gateways(redis),
        "batches": batches,
    }


def render(state: dict[str, Any]) -> str:
    rows = [["MODEL", "STATE", "WORKERS", "LOADING", "QUEUED", "BATCH CHUNKS QUEUED", "CONVEYOR UP"]]
    rows += [[name, m["state"], m["workers"], m["loading"], m["queued"], m["bulk_queued"], _fleet(m["fleet"])]
             for name, m in state["models"].items()]  # fmt: skip
    out = [table(rows) if state["models"] else "no models: no worker has registered with this Redis yet"]
    for name, m in state["models"].items():
        if m["fleet"] and m["fleet"]["state"] == "failed" and m["fleet"]["last_log"]:
            out.append(f"last log lines of {name}:\n" + "\n".join(f"  {line}" for line in m["fleet"]["last_log"]))
    now = time.time()
    if state["workers"]:
        rows = [["WORKER", "MODEL", "STATE", "METRICS AT", "PID", "UP"]]
        rows += [[w["worker_id"], w["model"], w["state"], f"{w['address'] or w['host']}:{w['metrics_port']}",
                  w["pid"], f"{now - w['started']:.0f} s"] for w in state["workers"]]  # fmt: skip
        out.append(table(rows))
    out.append("gateways: " + (", ".join(state["gateways"]) or "none running"))
    if state["batches"]:
        rows = [["BATCH", "STATUS", "DONE", "FAILED", "LINES"]]
        rows += [[b["id"], b["status"], b["completed"], b["failed"], b["total"]] for b in state["batches"]]
        out.append(table(rows))
    return "\n\n".join(out)


def _fleet(run: dict[str, Any] | None) -> str:
    """How ``conveyor up`` runs the model: its state, workers serving of wanted, restarts, and why."""
    if run is None:
        return "-"
    text = f"{run['state']} {run['serving']}/{run['replicas']}"
    if run["restarts"]:
        text += f", {run['restarts']} restarts"
    return f"{text}: {run['message']}" if run["message"] else text


def table(rows: list[list[Any]]) -> str:
    """Rows (the first is the header) as aligned columns of plain text."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


def show(redis_url: str) -> int:
    async def read() -> dict[str, Any]:
        redis = redis_client.connect(redis_url)
        try:
            return await snapshot(redis)
        finally:
            await redis_client.close(redis)

    try:
        state = asyncio.run(read())
    except REDIS_DOWN as exc:
        print(f"conveyor status: cannot reach Redis at {redis_url}: {exc}")
        return 1
    print(render(state))
    return 0
