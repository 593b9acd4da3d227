"""HTTP routes of the Files and Batches APIs (OpenAI's shapes, so the official SDK works unchanged). Thin: parse,
call ``gateway.files`` / ``gateway.batches``, answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from conveyor.batch_lines import BatchObject, FileObject, list_page
from gateway import expiry, guard
from gateway.batches import BatchCreate, BatchService
from gateway.files import FileService

bulk = APIRouter(prefix="/v1")


def files_of(request: Request) -> FileService:
    service: FileService = request.app.state.files
    return service


def viewer(request: Request) -> str | None:
    """The managed API key whose files and batches the request may see (None: a static key or none, sees all)."""
    key = guard.api_key_of(request)
    return key.id if key is not None else None


def batches_of(request: Request) -> BatchService:
    service: BatchService = request.app.state.batches
    return service


@bulk.post("/files")
async def upload_file(
    request: Request,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
    expires_after: Annotated[str | None, Form()] = None,
) -> FileObject:
    policy = expiry.from_form(anchor, seconds, expires_after)  # as the SDK sends it, or one JSON field
    return await files_of(request).upload(file, purpose, viewer(request), policy)


@bulk.get("/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    found, more = await files_of(request).list(purpose, after, limit, order, viewer(request))
    return list_page(found, more)


@bulk.get("/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> FileObject:
    return await files_of(request).get(file_id, viewer(request))


@bulk.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    await files_of(request).delete(file_id, viewer(request))
    return {"id": file_id, "object": "file", "deleted": True}


@bulk.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def file_content(request: Request, file_id: str) -> StreamingResponse:
    blocks = await files_of(request).content(file_id, viewer(request))
    return StreamingResponse(blocks, media_type="application/octet-stream")


@bulk.post("/batches")
async def create_batch(request: Request, body: BatchCreate) -> BatchObject:
    return await batches_of(request).create(body, guard.api_key_of(request))


@bulk.get("/batches")
async def list_batches(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    found, more = await batches_of(request).list(after, limit, viewer(request))
    return list_page(found, more)


@bulk.get("/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> BatchObject:
    return await batches_of(request).get(batch_id, viewer(request))


@bulk.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> BatchObject:
    return await batches_of(request).cancel(batch_id, viewer(request))
