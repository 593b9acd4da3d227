"""The Files API's logic: uploads checked line by line as they stream into the store, listing, content, deletion,
and the output files batches produce."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import Literal

from fastapi import UploadFile

from conveyor import key_layout
from conveyor.batch_lines import (
    BATCH_INPUT_EXPIRY_SECONDS,
    MAX_FILE_BYTES,
    ExpiresAfter,
    FileCheck,
    FileObject,
    LineError,
    StoredFile,
)
from conveyor.errors import InvalidRequest, NotFound, PayloadTooLarge
from conveyor.filestore import BLOCK_BYTES, FileStore
from gateway import expiry
from gateway.batch_store import BatchStore
from gateway.directory import ModelDirectory

UPLOAD_PURPOSES = ("batch",)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


class FileService:
    def __init__(self, store: FileStore, batches: BatchStore, directory: ModelDirectory, min_expiry: int) -> None:
        self.store = store
        self.batches = batches
        self.directory = directory
        #: the shortest expiry a request may ask for (``GatewaySettings.min_expiry_seconds``)
        self.min_expiry = min_expiry

    async def upload(
        self,
        upload: UploadFile,
        purpose: str,
        owner: str | None = None,
        expires_after: ExpiresAfter | None = None,
    ) -> FileObject:
        """Check and store an upload. It expires as ``expires_after`` says; without it, a batch input file expires
        after 30 days (OpenAI's default)."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"purpose {purpose!r} is not supported here; upload batch input files with purpose 'batch'.",
                param="purpose",
                code="invalid_purpose",
            )
        lifetime = BATCH_INPUT_EXPIRY_SECONDS
        if expires_after is not None:
            lifetime = expiry.checked_seconds(expires_after, "expires_after", self.min_expiry)
        file_id = new_file_id()
        check = FileCheck()
        name = key_layout.stored_file_name(file_id)
        try:
            size = await self.store.write(name, _checked(upload, check))
        except LineError as exc:
            raise InvalidRequest(exc.message, param=exc.param or "file", code=exc.code) from None
        try:
            await self._check_models(check)
        except BaseException:
            await self.store.delete(name)
            raise
        created_at = int(self.batches.clock())
        stored = StoredFile(
            file=FileObject(
                id=file_id,
                bytes=size,
                created_at=created_at,
                filename=upload.filename or "upload.jsonl",
                purpose="batch",
                expires_at=created_at + lifetime,
            ),
            store_name=name,
            lines=check.lines,
            urls=sorted(check.urls),
            models=check.models,
            owner=owner,
        )
        await self.batches.save_file(stored)
        return stored.file

    async def _check_models(self, check: FileCheck) -> None:
        for model, line in sorted(check.models.items(), key=lambda item: item[1]):
            if not await self.directory.is_known(model):
                raise InvalidRequest(
                    f"Line {line}: model {model!r} is not served here.", param="body.model", code="model_not_found"
                )

    async def add_output(
        self,
        file_id: str,
        filename: str,
        blocks: AsyncIterable[bytes],
        owner: str | None = None,
        lifetime: int | None = None,
    ) -> FileObject | None:
        """Store a batch's output or error file under ``file_id`` (written again whole on a retry), owned by the
        batch's API key, expiring ``lifetime`` seconds after it is written (None: never); None when it would be
        empty."""
        name = key_layout.stored_file_name(file_id)
        size = await self.store.write(name, blocks)
        if size == 0:
            await self.store.delete(name)
            return None
        now = int(self.batches.clock())
        expires_at = None if lifetime is None else now + lifetime
        created = FileObject(
            id=file_id, bytes=size, created_at=now, filename=filename, purpose="batch_output", expires_at=expires_at
        )
        await self.batches.save_file(StoredFile(file=created, store_name=name, owner=owner))
        return created

    async def get(self, file_id: str, viewer: str | None = None) -> FileObject:
        return (await self.batches.file(file_id, viewer)).file

    async def list(
        self,
        purpose: str | None,
        after: str | None,
        limit: int,
        order: Literal["asc", "desc"],
        viewer: str | None = None,
    ) -> tuple[list[FileObject], bool]:
        found: list[FileObject] = []
        cursor = after
        while len(found) < limit:  # a purpose filter may skip some: page on until enough or none left
            ids, more = await self.batches.page(key_layout.FILES_INDEX, cursor, limit, newest_first=order == "desc")
            for file_id in ids:
                stored = await self._maybe(file_id)
                if stored is None or not stored.visible_to(viewer):
                    continue
                if purpose is None or stored.file.purpose == purpose:
                    found.append(stored.file)
            if not more or not ids:
                return found[:limit], len(found) > limit
            cursor = ids[-1]
        return found[:limit], True

    async def _maybe(self, file_id: str) -> StoredFile | None:
        try:
            return await self.batches.file(file_id)
        except NotFound:  # deleted since it was listed
            return None

    async def content(self, file_id: str, viewer: str | None = None) -> AsyncIterator[bytes]:
        stored = await self.batches.file(file_id, viewer)
        return self.store.read(stored.store_name)

    async def delete(self, file_id: str, viewer: str | None = None) -> None:
        stored = await self.batches.file(file_id, viewer)
        for batch_id in await self.batches.active():
            if (await self.batches.batch(batch_id)).input_file_id == file_id:
                raise InvalidRequest(
                    f"File {file_id} is the input of batch {batch_id}, which is still running; cancel it first.",
                    param="file_id",
                    code="file_in_use",
                )
        await self.batches.forget_file(file_id)
        await self.store.delete(stored.store_name)


async def _checked(upload: UploadFile, check: FileCheck) -> AsyncIterator[bytes]:
    """The upload's bytes, a block at a time, each line checked as it passes; over the size limit is 413."""
    size = 0
    while block := await upload.read(BLOCK_BYTES):
        size += len(block)
        if size > MAX_FILE_BYTES:
            raise PayloadTooLarge(f"A batch input file holds at most {MAX_FILE_BYTES // 2**20} MB.", param="file")
        check.feed(block)
        yield block
    check.finish()
