"""The Batches API's logic: create, retrieve, list, cancel. What happens to a batch after that is the driver's
(``gateway.batch_driver``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from pydantic import BaseModel, Field, field_validator

from conveyor import key_layout
from conveyor.batch_lines import FINAL_STATUSES, KIND_FOR_URL, BatchObject, ExpiresAfter
from conveyor.errors import InvalidRequest, ModelNotFound, NotFound
from conveyor.keys import ApiKey
from gateway import expiry
from gateway.batch_store import BatchOwner, BatchStore
from gateway.settings import GatewaySettings

COMPLETION_WINDOWS = ("24h",)


class BatchCreate(BaseModel):
    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    #: how long the batch's output and error files live after they are written (OpenAI's ``output_expires_after``)
    output_expires_after: ExpiresAfter | None = None

    @field_validator("endpoint")
    @classmethod
    def _supported_endpoint(cls, endpoint: str) -> str:
        if endpoint not in KIND_FOR_URL:
            raise ValueError(f"must be one of {', '.join(KIND_FOR_URL)}")
        return endpoint

    @field_validator("completion_window")
    @classmethod
    def _window(cls, window: str) -> str:
        if window not in COMPLETION_WINDOWS:
            raise ValueError("only '24h' is supported")
        return window

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None and (
            len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())
        ):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return metadata


class BatchService:
    def __init__(self, batches: BatchStore, settings: GatewaySettings) -> None:
        self.batches = batches
        self.settings = settings
        #: makes the batch driver look now (set when the driver starts)
        self.wake: Callable[[], None] = lambda: None

    async def progress(self) -> dict[str, dict[str, int]]:
        """Lines of the unfinished batches per model (for the metrics)."""
        return await self.batches.progress()

    async def create(self, request: BatchCreate, key: ApiKey | None = None) -> BatchObject:
        """A new batch; made with a managed API key, it runs as that key (its models, its token budget, its usage)."""
        output_expiry = None
        if request.output_expires_after is not None:
            minimum = self.settings.min_expiry_seconds
            output_expiry = expiry.checked_seconds(request.output_expires_after, "output_expires_after", minimum)
        stored = await self.batches.file(request.input_file_id, key.id if key else None)
        barred = sorted(set(stored.models) - set(key.models)) if key is not None and key.models is not None else []
        if barred:
            raise ModelNotFound(
                f"The model `{barred[0]}` does not exist or you do not have access to it.", param="input_file_id"
            )
        if stored.file.purpose != "batch":
            raise InvalidRequest(
                f"File {request.input_file_id} has purpose {stored.file.purpose!r}; a batch needs one uploaded with "
                "purpose 'batch'.",
                param="input_file_id",
                code="invalid_file_purpose",
            )
        now = int(time.time())
        batch = BatchObject(
            id=f"batch_{uuid.uuid4().hex[:24]}",
            endpoint=request.endpoint,
            input_file_id=request.input_file_id,
            completion_window=request.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + int(self.settings.batch_window_seconds),
            metadata=request.metadata,
            model=next(iter(stored.models), None),
        )
        owner = BatchOwner(key_id=key.id, name=key.name) if key else None
        await self.batches.create_batch(batch, owner, output_expiry)
        self.wake()
        return batch

    async def get(self, batch_id: str, viewer: str | None = None) -> BatchObject:
        return await self.batches.batch(batch_id, viewer)

    async def list(self, after: str | None, limit: int, viewer: str | None = None) -> tuple[list[BatchObject], bool]:
        found: list[BatchObject] = []
        cursor = after
        while len(found) <= limit:  # a key sees only its own: page on until enough or none left
            ids, more = await self.batches.page(key_layout.BATCHES_INDEX, cursor, limit)
            found += [batch for i in ids if (batch := await self._seen(i, viewer)) is not None]
            if not more or not ids:
                break
            cursor = ids[-1]
        return found[:limit], len(found) > limit

    async def _seen(self, batch_id: str, viewer: str | None) -> BatchObject | None:
        try:
            return await self.batches.batch(batch_id, viewer)
        except NotFound:  # another key's, or deleted since it was listed
            return None

    async def cancel(self, batch_id: str, viewer: str | None = None) -> BatchObject:
        batch = await self.get(batch_id, viewer)
        if batch.status in FINAL_STATUSES:
            raise InvalidRequest(
                f"Batch {batch_id} is {batch.status}: only a validating or in-progress batch can be cancelled.",
                param="batch_id",
                code="batch_not_cancellable",
            )
        await self.batches.move(batch_id, ("validating", "in_progress"), "cancelling")
        self.wake()
        return await self.batches.batch(batch_id)
