"""The admin API: managed API keys and their usage (``conveyor.keys``). Served only when ``CONVEYOR_ADMIN_KEY`` is set,
and only to that bearer key (``gateway.guard``). ``conveyor keys`` does the same from a shell, straight on Redis."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from conveyor.keys import ApiKey, CreatedKey, KeyCreate, KeyStore, KeyUpdate
from gateway.queue import redis_errors

admin = APIRouter(prefix="/admin")
UsageDays = Annotated[int, Query(ge=1, le=400, description="days back from today (UTC), today included")]


def keys_of(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _list(data: list[Any]) -> dict[str, Any]:
    return {"object": "list", "data": data}


@admin.get("/keys")
async def list_keys(request: Request, include_revoked: bool = False) -> dict[str, Any]:
    with redis_errors():
        return _list(await keys_of(request).list_keys(include_revoked))


@admin.post("/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request) -> CreatedKey:
    """The new key's secret is in ``value``: shown here once, never again."""
    with redis_errors():
        return await keys_of(request).create(body)


@admin.get("/keys/{key}")
async def get_key(key: str, request: Request) -> ApiKey:
    """By id, or an active key by name."""
    with redis_errors():
        return await keys_of(request).get(key)


@admin.patch("/keys/{key}")
async def update_key(key: str, body: KeyUpdate, request: Request) -> ApiKey:
    with redis_errors():
        return await keys_of(request).update(key, body)


@admin.delete("/keys/{key}")
async def revoke_key(key: str, request: Request) -> ApiKey:
    """Revoke: the key stops working on every gateway within ``key_cache_seconds``; its record and usage stay."""
    with redis_errors():
        return await keys_of(request).revoke(key)


@admin.get("/keys/{key}/usage")
async def key_usage(key: str, request: Request, days: UsageDays = 30) -> dict[str, Any]:
    with redis_errors():
        return _list(await keys_of(request).usage(key, days))


@admin.get("/usage")
async def usage(request: Request, days: UsageDays = 30) -> dict[str, Any]:
    """Every key's usage per model and UTC day."""
    with redis_errors():
        return _list(await keys_of(request).usage(None, days))
