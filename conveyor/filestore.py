"""Where uploaded files and batch outputs live: a small interface and a local-directory implementation.

The gateway writes uploads and batch outputs; workers read the input lines of the bulk chunks they run and write
each chunk's results. So every gateway and worker must reach the same store: on one host the data directory
(``conveyor up`` needs nothing else), in Compose or Kubernetes one shared volume mounted at the same path.

``CONVEYOR_FILES_URL`` chooses it: a directory path or ``file://`` URL (default ``<data dir>/files``), or
``s3://bucket/prefix`` for S3-compatible object storage (the ``s3`` extra: boto3, configured the AWS way:
``AWS_ENDPOINT_URL`` for a non-AWS server, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlparse

from conveyor import paths

#: how much of a file is read or written per step: bounded memory whatever the file's size
BLOCK_BYTES = 1 << 20


class FileStore(Protocol):
    async def write(self, name: str, blocks: AsyncIterable[bytes]) -> int:
        """Store ``blocks`` under ``name`` and return the bytes written. Atomic: readers see the whole file or
        none of it; writing a name again replaces it whole."""

    def read(self, name: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of ``name``, a block at a time. Raises ``FileNotFoundError``."""

    async def delete(self, name: str) -> None:
        """Remove ``name``; removing what is not there is not an error."""


class LocalFileStore:
    """Files under one directory; names may contain ``/`` (sub-directories)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"file name {name!r} leaves the store")
        return path

    async def write(self, name: str, blocks: AsyncIterable[bytes]) -> int:
        path = self._path(name)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        written = 0
        handle = await asyncio.to_thread(partial.open, "wb")
        try:
            async for block in blocks:
                await asyncio.to_thread(handle.write, block)
                written += len(block)
            await asyncio.to_thread(_flush_and_sync, handle)
        except BaseException:
            handle.close()
            partial.unlink(missing_ok=True)
            raise
        handle.close()
        await asyncio.to_thread(os.replace, partial, path)
        return written

    async def read(self, name: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self._path(name).open, "rb")
        try:
            handle.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                block = await asyncio.to_thread(handle.read, BLOCK_BYTES if left is None else min(left, BLOCK_BYTES))
                if not block:
                    return
                if left is not None:
                    left -= len(block)
                yield block
        finally:
            handle.close()

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self._path(name).unlink, missing_ok=True)


class S3FileStore:
    """Objects under ``prefix`` in one bucket. Writes stream as a multipart upload (parts of ``PART_BYTES``), which
    S3 makes visible only when completed: atomic, and never more than one part in memory."""

    PART_BYTES = 8 << 20  # S3's minimum part is 5 MiB

    def __init__(self, bucket: str, prefix: str) -> None:
        import boto3  # the s3 extra

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    async def write(self, name: str, blocks: AsyncIterable[bytes]) -> int:
        key, buffer, written = self._key(name), bytearray(), 0
        upload_id: str | None = None
        parts: list[dict[str, object]] = []
        try:
            async for block in blocks:
                buffer += block
                written += len(block)
                if len(buffer) >= self.PART_BYTES:
                    if upload_id is None:
                        started = await asyncio.to_thread(
                            self.client.create_multipart_upload, Bucket=self.bucket, Key=key
                        )
                        upload_id = started["UploadId"]
                    parts.append(await self._part(key, upload_id, len(parts) + 1, bytes(buffer)))
                    buffer.clear()
            if upload_id is None:
                await asyncio.to_thread(self.client.put_object, Bucket=self.bucket, Key=key, Body=bytes(buffer))
                return written
            if buffer:
                parts.append(await self._part(key, upload_id, len(parts) + 1, bytes(buffer)))
            await asyncio.to_thread(
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            if upload_id is not None:
                await asyncio.to_thread(
                    self.client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id
                )
            raise
        return written

    async def _part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, object]:
        done = await asyncio.to_thread(
            self.client.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": done["ETag"]}

    async def read(self, name: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        span = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            answer = await asyncio.to_thread(
                self.client.get_object, Bucket=self.bucket, Key=self._key(name), Range=span
            )
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(name) from None
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object
                return
            raise
        body = answer["Body"]
        try:
            while block := await asyncio.to_thread(body.read, BLOCK_BYTES):
                yield block
        finally:
            body.close()

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=self._key(name))


def _flush_and_sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def default_url() -> str:
    return str(paths.data_dir() / "files")


def open_store(url: str | None) -> FileStore:
    """The store ``url`` names (a path or ``file://``); ``None`` is the default under the data directory."""
    url = url or default_url()
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalFileStore(Path(parsed.path if parsed.scheme else url).expanduser())
    if parsed.scheme == "s3" and parsed.netloc:
        return S3FileStore(parsed.netloc, parsed.path)
    raise ValueError(f"CONVEYOR_FILES_URL: unsupported store {url!r} (a directory, file:// or s3://bucket/prefix)")


async def lines(blocks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The lines of a byte stream without their ``\\n`` (so ``len(line) + 1`` is its size on disk; a ``\\r`` before
    it stays, which JSON reads as whitespace). A last line without a line end is still a line."""
    rest = b""
    async for block in blocks:
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part
    if rest:
        yield rest
