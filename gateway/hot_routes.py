"""The three routes that carry nearly all traffic (chat, completions, embeddings), served without FastAPI's routing,
dependency and validation stack, which costs more of the gateway's CPU per request than Conveyor's own code.

It takes only what it can serve whole: a POST to one of those paths, with a JSON content type, whose body the route's
request model validates. Anything else (an invalid body, another content type, a body that is not UTF-8 JSON) goes on
to the FastAPI app with the body already read, so its answer is exactly the one FastAPI's route gives. What it takes
runs the route's own ``routes.serve``, its errors are mapped by ``gateway.errors.as_error`` (as the app's handlers
map them), and it carries the FastAPI route in the scope, so metrics label it the same. The routes stay in
the FastAPI app: they are in the OpenAPI schema, and they answer whatever is handed on.
"""

from __future__ import annotations

import typing

from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.contract import JobKind
from gateway import errors, routes

#: what FastAPI's route raises when reading the body fails other than by its size
PARSE_FAILURE = HTTPException(400, errors.FASTAPI_PARSE_FAILURE)


class _Hot(typing.NamedTuple):
    kind: JobKind
    model: type[BaseModel]
    route: APIRoute


def _is_json(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.partition(b";")[0].strip().lower() == b"application/json"


class HotRoutes:
    def __init__(self, app: ASGIApp, app_routes: list[BaseRoute]) -> None:
        self.app = app
        self.hot: dict[str, _Hot] = {}
        for route in app_routes:
            kind = routes.HOT_PATHS.get(getattr(route, "path", ""))
            if isinstance(route, APIRoute) and kind is not None and "POST" in route.methods:
                self.hot[route.path] = _Hot(kind, typing.get_type_hints(route.endpoint)["body"], route)
        if missing := set(routes.HOT_PATHS) - set(self.hot):
            raise RuntimeError(f"no FastAPI route for the hot paths {sorted(missing)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.hot.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if hot is None or scope.get("root_path") or not _is_json(_header(scope, b"content-type")):
            await self.app(scope, receive, send)
            return
        scope["route"] = hot.route  # what FastAPI's router sets: the endpoint label of every outcome
        request = Request(scope, receive)
        try:
            body = await request.body()
        except Exception as exc:  # the guard's 413 for a chunked body past the limit; or the client left (as FastAPI)
            await self._refuse(request, exc if isinstance(exc, HTTPException) else PARSE_FAILURE, send)
            return
        try:
            parsed = hot.model.model_validate_json(body)
        except ValidationError:  # FastAPI's route answers it, with the error it always gives
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            response = await routes.serve(request, hot.kind, parsed)
        except Exception as exc:
            await self._refuse(request, exc, send)
            return
        await response(scope, receive, send)

    @staticmethod
    async def _refuse(request: Request, exc: Exception, send: Send) -> None:
        """Answer ``exc`` as the app's handlers do; an unexpected one goes up to the app's 500 handler."""
        error = errors.as_error(request, exc)
        if error is None:
            raise exc
        await errors.respond(request, error)(request.scope, request.receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives the body read here once, then whatever the client sends next (its disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
