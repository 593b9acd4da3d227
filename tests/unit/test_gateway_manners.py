"""The gateway's manners toward people and browsers: what ``GET /`` says, which routes ``/docs`` shows, and CORS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import fakeredis
import httpx

from conveyor import VERSION
from gateway.settings import GatewaySettings
from tests.unit.conftest import running_gateway

ADMIN = {"CONVEYOR_ADMIN_KEY": "admin-key-for-unit"}
ORIGIN = "https://app.example.com"


@asynccontextmanager
async def gateway(server: fakeredis.FakeServer, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(server, GatewaySettings(models=["chat"], **settings)) as application:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


async def test_the_root_names_the_service_its_version_and_its_endpoints(fake_server: fakeredis.FakeServer) -> None:
    async with gateway(fake_server) as client:
        root = (await client.get("/")).json()
    assert root["name"] == "conveyor" and root["version"] == VERSION and VERSION != "0+unknown"
    endpoints = {(e["method"], e["path"]) for e in root["endpoints"]}
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/models")} <= endpoints
    assert {("POST", "/v1/batches"), ("GET", "/health"), ("GET", "/ready")} <= endpoints
    assert not any(path.startswith("/admin") for _, path in endpoints)  # no admin API without an admin key
    async with gateway(fake_server, **ADMIN) as client:
        with_admin = {(e["method"], e["path"]) for e in (await client.get("/")).json()["endpoints"]}
    assert ("POST", "/admin/keys") in with_admin and ("PATCH", "/admin/models/{name}") in with_admin


async def test_the_api_docs_show_the_admin_routes_only_where_they_exist(fake_server: fakeredis.FakeServer) -> None:
    async with gateway(fake_server) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert (await client.get("/docs")).status_code == 200
    assert "/v1/chat/completions" in paths and not [p for p in paths if p.startswith("/admin")]
    async with gateway(fake_server, **ADMIN) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/admin/keys" in paths and "/admin/models" in paths


async def test_cors_is_off_unless_origins_are_configured(fake_server: fakeredis.FakeServer) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    async with gateway(fake_server) as client:
        answer = await client.get("/v1/models", headers={"Origin": ORIGIN})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        refused = await client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in refused.headers
    async with gateway(fake_server, cors_origins=f"{ORIGIN}, https://other.example.com") as client:
        allowed = await client.options("/v1/chat/completions", headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        answer = await client.get("/v1/models", headers={"Origin": ORIGIN})
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert "x-ratelimit-remaining-tokens" in answer.headers["access-control-expose-headers"]
        missing = await client.post("/v1/chat/completions", json={}, headers={"Origin": ORIGIN})
        assert missing.status_code == 400 and missing.headers["access-control-allow-origin"] == ORIGIN
        stranger = await client.options("/v1/chat/completions", headers=preflight | {"Origin": "https://evil.test"})
        assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
