"""What every request meets before anything parses its body: the API key check and the body size limit.

A pure ASGI middleware, so a client without a key is refused 401 before a byte of its body is read, and a body
over ``max_body_bytes`` is refused 413 from its ``Content-Length`` (or, sent chunked, as soon as it grows past the
limit) instead of being buffered.
"""

from __future__ import annotations

import hmac
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.errors import ConveyorError, PayloadTooLarge, Unauthorized
from gateway import errors
from gateway.settings import GatewaySettings

#: paths that need a key when keys are set (health, readiness and metrics stay open for probes and scrapers)
PROTECTED_PREFIXES = ("/v1/",)
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
        refusal = self._refusal(request)
        if refusal is not None:
            response = errors.respond(request, refusal)
            await response(scope, receive, send)
            return
        await self.app(scope, self._limited(receive, self._limit(request)), send)

    def _refusal(self, request: Request) -> ConveyorError | None:
        keys = self.settings.api_keys
        if keys and request.url.path.startswith(PROTECTED_PREFIXES):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), keys):
                return Unauthorized("Incorrect API key provided.")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._limit(request):
            return self._too_large(self._limit(request))
        return None

    def _limit(self, request: Request) -> int:
        """File uploads may be larger than any other request."""
        if request.method == "POST" and request.url.path == UPLOAD_PATH:
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
