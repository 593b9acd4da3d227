"""The admin API: managed API keys and their usage (``conveyor.keys``), and the fleet of models ``conveyor up`` runs
(``conveyor.fleet``). Served only when ``CONVEYOR_ADMIN_KEY`` is set, and only to that bearer key
(``gateway.guard``). ``conveyor keys`` does the same for keys from a shell, straight on Redis."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from conveyor.errors import Conflict, InvalidRequest, NotFound
from conveyor.fleet import FleetStore, ModelSpec
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


# --- the fleet ----------------------------------------------------------------------------------------------------


def fleet_of(request: Request) -> FleetStore:
    return FleetStore(request.app.state.redis)


async def _models(fleet: FleetStore) -> dict[str, dict[str, Any]]:
    """Every model of the fleet: its fields and how ``conveyor up`` runs it (``status``), from one read of each."""
    specs, runs = await fleet.specs(), await fleet.runs()
    return {
        name: {
            "object": "fleet.model",
            **spec.model_dump(),
            "status": run.model_dump() if (run := runs.get(name)) else None,
        }
        for name, spec in sorted(specs.items())
    }


async def _model(fleet: FleetStore, name: str) -> dict[str, Any]:
    found = (await _models(fleet)).get(name)
    if found is None:
        raise _missing(name)
    return found


async def _supervised(fleet: FleetStore) -> None:
    if not await fleet.managed():
        raise Conflict(
            "No `conveyor up` manages a fleet on this Redis, so nothing would start or stop the workers. Run "
            "`conveyor up`; in Kubernetes, change the manifests (deploy/k8s) instead.",
            code="no_supervisor",
        )


def _spec(fields: dict[str, Any]) -> ModelSpec:
    try:
        return ModelSpec.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{param}': {message}" if param else message, param=param) from None


@admin.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every model of the fleet: its models-file fields and how ``conveyor up`` runs it (``status``)."""
    with redis_errors():
        return _list(list((await _models(fleet_of(request))).values()))


def _missing(name: str) -> NotFound:
    return NotFound(f"No model {name!r} in the fleet.", param="name", code="model_not_found")


@admin.post("/models", status_code=201)
async def add_model(body: dict[str, Any], request: Request) -> dict[str, Any]:
    """Add a model (the fields of a ``[[models]]`` table); ``conveyor up`` starts its workers within a second."""
    spec, fleet = _spec(body), fleet_of(request)

    def added(current: ModelSpec | None) -> ModelSpec:
        if current is not None:
            raise Conflict(f"Model {spec.name!r} is in the fleet already; PATCH it.", param="name", code="model_exists")
        return spec

    with redis_errors():
        await _supervised(fleet)
        await fleet.change(spec.name, added)
        return await _model(fleet, spec.name)


@admin.get("/models/{name:path}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    with redis_errors():
        return await _model(fleet_of(request), name)


@admin.patch("/models/{name:path}")
async def change_model(name: str, body: dict[str, Any], request: Request) -> dict[str, Any]:
    """Change fields of a model: replicas alone scale it; anything else rolls it (new workers serve before the old
    ones drain)."""
    if body.get("name", name) != name:
        raise InvalidRequest("A model cannot be renamed; add it under the new name, remove this one.", param="name")

    def changed(current: ModelSpec | None) -> ModelSpec:
        if current is None:
            raise _missing(name)
        return _spec(current.model_dump(exclude={"replicas"} if "gpus" in body else set()) | body)

    fleet = fleet_of(request)
    with redis_errors():
        await _supervised(fleet)
        await fleet.change(name, changed)
        return await _model(fleet, name)


@admin.delete("/models/{name:path}")
async def remove_model(name: str, request: Request) -> dict[str, Any]:
    """Remove a model: its workers drain and stop, then it is forgotten (404)."""

    def removed(current: ModelSpec | None) -> None:
        if current is None:
            raise _missing(name)

    fleet = fleet_of(request)
    with redis_errors():
        await _supervised(fleet)
        await fleet.change(name, removed)
    return {"id": name, "object": "fleet.model", "deleted": True}
