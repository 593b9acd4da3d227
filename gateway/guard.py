"""What every request meets before anything parses its body: the API key check and the body size limit.

A pure ASGI middleware, so a client without a key is refused 401 before a byte of its body is read, and a body
over ``max_body_bytes`` is refused 413 from its ``Content-Length`` (or, sent chunked, as soon as it grows past the
limit) instead of being buffered.

Keys: a static key (``CONVEYOR_GATEWAY_API_KEYS``) or a managed one (``conveyor keys``, looked up through
``gateway.key_cache``); the managed key is put on the request (``api_key_of``) for its limits and usage. Requests need
no key only while no static key is set and no managed key was ever created. ``/admin/`` routes need
``CONVEYOR_ADMIN_KEY`` and do not exist without it.
"""

from __future__ import annotations

import hmac
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.errors import ConveyorError, NotFound, PayloadTooLarge, Unauthorized
from conveyor.keys import ApiKey
from gateway import errors
from gateway.key_cache import KeyCache
from gateway.settings import GatewaySettings

ADMIN_PREFIX = "/admin/"
UPLOAD_PATH = "/v1/files"


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit that would time the match)."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    return matched


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrived"] = time.time()
        request = Request(scope)
        try:
            refusal = await self._refusal(request)
        except ConveyorError as exc:  # Redis down while looking a key up
            refusal = exc
        if refusal is not None:
            response = errors.respond(request, refusal)
            await response(scope, receive, send)
            return
        await self.app(scope, self._limited(receive, self._limit(request)), send)

    async def _refusal(self, request: Request) -> ConveyorError | None:
        path = _path(request)
        if errors.is_api_path(path):  # health, readiness and metrics stay open for probes and scrapers
            refusal = await self._client_refusal(request)
            if refusal is not None:
                return refusal
        elif path.startswith(ADMIN_PREFIX):
            admin = self.settings.admin_key
            if admin is None:
                return NotFound(f"No route {request.method} {request.url.path}.")
            if not key_matches(_bearer(request) or "", [admin]):
                return Unauthorized("Incorrect admin key provided (CONVEYOR_ADMIN_KEY).")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._limit(request):
            return self._too_large(self._limit(request))
        return None

    async def _client_refusal(self, request: Request) -> ConveyorError | None:
        static = self.settings.api_keys
        token = _bearer(request)
        if token and static and key_matches(token, static):
            return None
        keys: KeyCache = request.app.state.key_cache
        key = await keys.resolve(token) if token else None
        if key is not None:
            request.state.api_key = key
            return None
        if static or await keys.required():
            return Unauthorized("Incorrect API key provided.")
        return None

    def _limit(self, request: Request) -> int:
        """File uploads may be larger than any other request."""
        if request.method == "POST" and _path(request) == UPLOAD_PATH:
            return self.settings.max_upload_bytes
        return self.settings.max_body_bytes

    @staticmethod
    def _too_large(limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than {limit} bytes.")

    def _limited(self, receive: Receive, limit: int) -> Receive:
        """``receive`` that refuses a chunked body once it grows past the limit."""
        seen = 0

        async def guarded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, self._too_large(limit).message)
            return message

        return guarded


def _path(request: Request) -> str:
    """The request's path, to route on: ``request.url.path`` without building the URL (7 us a request), with the
    leading ``/`` the URL adds. They differ only where the URL escapes ``?``, ``#`` and ``\\``, which no prefix or
    path compared here contains."""
    path: str = request.scope["path"]
    return path if path.startswith("/") or not path else "/" + path


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def api_key_of(request: Request) -> ApiKey | None:
    """The managed key the request came with (None: a static key, or no key needed)."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    return key


def may_use(request: Request, model: str) -> bool:
    key = api_key_of(request)
    return key is None or key.models is None or model in key.models
