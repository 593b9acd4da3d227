"""What moves a batch through OpenAI's lifecycle after it was created. Every gateway replica runs one driver.

    validating -> in_progress -> finalizing -> completed
    validating -> failed (lines this batch cannot run, listed in ``errors``)
    in_progress -> expired (the window ended: what finished is delivered, the rest is in the error file)
    validating | in_progress -> cancelling -> cancelled (what finished is delivered)

Why here, and why it survives what it must:
- **One driver per batch at a time**, whichever replica holds the batch's lease in Redis (renewed every round,
  lapsing 15 s after its holder died). Two replicas never step the same batch at once; a restarted or killed
  gateway's batches are taken over by any other (or by itself when it comes back).
- **Every step can be repeated**: chunks are queued only if absent; output files have ids derived from the batch
  and are written whole; a status moves only by compare-and-set. A driver that dies mid-step leaves a step the
  next one simply does again.
- **The work itself is on the queue**: chunks are ordinary leased jobs on the model's bulk lane, so a SIGKILLed
  worker's chunk is run again by another, and a chunk's results count once (the fold in ``gateway.batch_store``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from conveyor import contract, key_layout, token_estimate
from conveyor.batch_lines import (
    FINAL_STATUSES,
    KIND_FOR_URL,
    BatchError,
    BatchErrors,
    BatchObject,
    LineError,
    StoredFile,
    parse_line,
)
from conveyor.contract import ChunkRef, JobEnvelope, TenantRef
from conveyor.errors import BackendUnavailable, NotFound
from conveyor.filestore import FileStore, lines
from conveyor.keys import KeyStore
from conveyor.outage import Outage
from gateway.batch_store import BatchOwner, BatchStore
from gateway.directory import ModelDirectory
from gateway.files import FileService
from gateway.queue import JobQueue, JobState
from gateway.settings import GatewaySettings

log = logging.getLogger("conveyor.gateway")

LEASE_SECONDS = 15.0
#: chunks offered to the bulk lane per round (workers run a few hundred lines a second: this is never the bottleneck)
RELEASE_PER_ROUND = 256
#: a chunk of a batch whose key limits tokens per minute is estimated at most at this fraction of its batch share
CHUNKS_PER_SHARE = 4
ROUND_SECONDS = 1.0
#: at most this many line errors are listed on a failed batch
MAX_LISTED_ERRORS = 100
UNFINISHED = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}
UNREADABLE = ("file_store_unreachable", "The worker could not read this request from the file store.")
PART_KINDS: tuple[Literal["out", "err"], ...] = ("out", "err")


class BatchDriver:
    def __init__(
        self,
        batches: BatchStore,
        files: FileService,
        store: FileStore,
        queue: JobQueue,
        directory: ModelDirectory,
        settings: GatewaySettings,
        outage: Outage,
    ) -> None:
        self.batches = batches
        self.files = files
        self.store = store
        self.queue = queue
        self.directory = directory
        self.settings = settings
        self.outage = outage
        self.holder = f"driver-{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._failures: dict[str, int] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.drive_all()
                self.outage.ok()
                delay = ROUND_SECONDS
            except BackendUnavailable as exc:
                delay = self.outage.failed(exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    async def drive_all(self) -> None:
        for batch_id in await self.batches.active():
            if await self.batches.take_lease(batch_id, self.holder, LEASE_SECONDS):
                await self._step_holding_lease(batch_id)

    async def _step_holding_lease(self, batch_id: str) -> None:
        async def keep() -> None:
            with contextlib.suppress(BackendUnavailable):  # the step fails on it too, and the lease lapses
                while True:
                    await asyncio.sleep(LEASE_SECONDS / 3)
                    await self.batches.take_lease(batch_id, self.holder, LEASE_SECONDS)

        keeper = asyncio.create_task(keep())
        try:
            await self.step(await self.batches.batch(batch_id))
            self._failures.pop(batch_id, None)
        except BackendUnavailable:
            raise
        except Exception:  # a bug or a store failure: logged (once a minute); the next round tries the step again
            failures = self._failures[batch_id] = self._failures.get(batch_id, 0) + 1
            if failures % 60 == 1:
                log.exception("batch %s: step failed (%d times); retrying every round", batch_id, failures)
            keeper.cancel()
            with contextlib.suppress(BackendUnavailable):  # another gateway (one that reaches the store) may take it
                await self.batches.drop_lease(batch_id, self.holder)
        finally:
            keeper.cancel()

    async def step(self, batch: BatchObject) -> None:
        if batch.status in FINAL_STATUSES:
            await self._retire(batch.id)
        elif batch.status == "validating":
            await self._validate(batch)
        elif batch.status == "in_progress":
            await self._progress(batch)
        elif batch.status == "cancelling":
            await self._wind_down(batch, "cancelled")
        elif batch.status == "finalizing":
            await self._finalize(batch, "completed")

    # --- validating -------------------------------------------------------------------------------------------

    async def _validate(self, batch: BatchObject) -> None:
        errors: list[BatchError] = []
        chunks: list[ChunkRef] = []
        try:
            stored = await self.batches.file(batch.input_file_id)
        except NotFound as exc:
            errors.append(BatchError(code="file_not_found", message=exc.message, param="input_file_id"))
        else:
            if batch.model is None or not await self.directory.is_known(batch.model):
                message = f"model {batch.model!r} is not served here."
                errors.append(BatchError(code="model_not_found", message=message, param="body.model"))
            chunks = await self._plan(batch, stored, errors)
        if errors:
            data = BatchErrors(data=errors[:MAX_LISTED_ERRORS]).model_dump_json()
            await self.batches.move(batch.id, ("validating",), "failed", errors=data)
            log.info("batch %s failed validation: %s", batch.id, errors[0].message)
            return
        total = chunks[-1].first_line + chunks[-1].lines if chunks else 0
        await self.batches.set_plan(batch.id, chunks, total)
        await self._release(batch, chunks)
        if await self.batches.move(batch.id, ("validating",), "in_progress"):
            log.info("batch %s: %d lines in %d chunks for %s's bulk lane", batch.id, total, len(chunks), batch.model)

    async def _plan(self, batch: BatchObject, stored: StoredFile, errors: list[BatchError]) -> list[ChunkRef]:
        """Cut the file into chunks of lines. Every line was checked at upload; the record of what its lines ask for
        tells whether any differs from the batch (its endpoint, one model), and only then is each line looked at. A
        batch made with an API key that has tokens per minute gets chunks of at most a quarter of its batch share
        (``_token_cap``), so a chunk never fills the key's window and the batch goes on beside interactive requests."""
        size = self.settings.batch_chunk_lines
        name = stored.store_name
        check = set(stored.urls) != {batch.endpoint} or set(stored.models) != {batch.model}
        owner = await self.batches.owner(batch.id)  # its lines' tokens are estimated, to charge its key
        cap = await self._token_cap(owner)
        chunks: list[ChunkRef] = []
        offset = start = count = in_chunk = tokens = 0
        async for raw in lines(self.store.read(name)):
            count += 1
            if check:
                self._check_line(batch, raw, count, errors)
            cost = self._estimate(batch, raw) if owner is not None else 0
            if in_chunk and (in_chunk == size or (cap and tokens + cost > cap)):
                chunks.append(self._chunk(batch, name, len(chunks), start, offset, count - in_chunk, in_chunk, tokens))
                start, in_chunk, tokens = offset, 0, 0
            offset += len(raw) + 1
            in_chunk, tokens = in_chunk + 1, tokens + cost
        if in_chunk:
            chunks.append(self._chunk(batch, name, len(chunks), start, offset, count - in_chunk + 1, in_chunk, tokens))
        return chunks

    async def _token_cap(self, owner: BatchOwner | None) -> int:
        """The most tokens one chunk of this batch may be estimated at (0: no cap)."""
        if owner is None:
            return 0
        try:
            tpm = (await KeyStore(self.batches.redis).get(owner.key_id)).tpm
        except NotFound:
            return 0
        return max(int((tpm or 0) * self.settings.batch_token_share / CHUNKS_PER_SHARE), 1) if tpm else 0

    def _estimate(self, batch: BatchObject, raw: bytes) -> int:
        """A line's estimated tokens (0 for a line validation refuses anyway)."""
        try:
            body = json.loads(raw).get("body")
        except (ValueError, AttributeError):
            return 0
        kind = KIND_FOR_URL.get(batch.endpoint)
        if not isinstance(body, dict) or kind is None:
            return 0
        return token_estimate.charge(kind, body, self.settings.default_output_tokens)

    @staticmethod
    def _check_line(batch: BatchObject, raw: bytes, number: int, errors: list[BatchError]) -> None:
        try:
            line = parse_line(raw, number)
            if line.url != batch.endpoint:
                raise LineError(number, f"`url` {line.url} differs from the batch's endpoint {batch.endpoint}.")
            if line.model != batch.model:
                raise LineError(number, f"model {line.model!r} differs: a batch runs one model ({batch.model}).")
        except LineError as exc:
            errors.append(BatchError(code=exc.code, message=exc.message, param=exc.param, line=number))

    @staticmethod
    def _chunk(
        batch: BatchObject, name: str, index: int, start: int, end: int, first: int, count: int, tokens: int
    ) -> ChunkRef:
        return ChunkRef(
            batch_id=batch.id,
            index=index,
            input_file=name,
            start=start,
            end=end,
            first_line=first - 1,
            lines=count,
            expires_at=float(batch.expires_at or time.time()),
            tokens=tokens,
        )

    async def _release(self, batch: BatchObject, plan: list[ChunkRef]) -> None:
        """Put the next chunks on the bulk lane, as far as the batch's API key has tokens to spare (``release``)."""
        released = await self.batches.released(batch.id)
        if released >= len(plan):
            return
        owner = await self.batches.owner(batch.id)
        now = time.time()
        offered = plan[released : released + RELEASE_PER_ROUND]
        count = await self.queue.release(
            batch.id, [self._envelope(batch, c, owner, now) for c in offered], self.settings.batch_token_share, now
        )
        if count < 0 and await self.batches.move(batch.id, ("validating", "in_progress"), "cancelling"):
            log.warning("batch %s: its API key %s was revoked; cancelling it", batch.id, owner.name if owner else "")

    def _envelope(
        self, batch: BatchObject, chunk: ChunkRef, owner: BatchOwner | None = None, now: float = 0.0
    ) -> JobEnvelope:
        """A chunk's job; with the batch's owner, charged the chunk's estimated tokens in second ``now``."""
        tenant = None
        if owner is not None:
            tenant = TenantRef(key_id=owner.key_id, name=owner.name, second=int(now), reserved=chunk.tokens)
        return JobEnvelope(
            request_id=key_layout.chunk_job_id(batch.id, chunk.index),
            model=batch.model or "",
            kind=KIND_FOR_URL[batch.endpoint],
            body={},
            created=batch.created_at + chunk.index / 1000,  # queued in batch order, chunks in file order
            deadline=chunk.expires_at,
            chunk=chunk,
            tenant=tenant,
        )

    # --- running ------------------------------------------------------------------------------------------------

    async def _progress(self, batch: BatchObject) -> None:
        done = await self.batches.fold_reports(batch.id)
        plan = await self.batches.plan(batch.id)
        if len(done) < len(plan):
            await self._release(batch, plan)
        if len(done) >= len(plan):
            if await self.batches.move(batch.id, ("in_progress",), "finalizing"):
                await self._finalize(await self.batches.batch(batch.id), "completed")
        elif batch.expires_at is not None and time.time() >= batch.expires_at:
            await self._wind_down(batch, "expired")

    async def _wind_down(self, batch: BatchObject, final: str) -> None:
        """Withdraw every chunk not done yet; once none runs any more, finalize with what finished."""
        done = await self.batches.fold_reports(batch.id)
        running = 0
        for chunk in await self.batches.plan(batch.id):
            if chunk.index in done:
                continue
            envelope = self._envelope(batch, chunk)
            state = await self.queue.state(envelope)
            if state is not JobState.GONE:
                await self.queue.cancel(envelope)
                running += state is JobState.RUNNING
        if running == 0:
            await self._finalize(batch, final)

    # --- finalizing ---------------------------------------------------------------------------------------------

    async def _finalize(self, batch: BatchObject, final: str) -> None:
        """Write the output and error files (again, whole, if a driver died here before) and end the batch."""
        done = await self.batches.fold_reports(batch.id)
        plan = await self.batches.plan(batch.id)
        stem = batch.id.removeprefix("batch_")
        owner = await self.batches.owner(batch.id)
        key_id = owner.key_id if owner else None
        lifetime = await self.batches.output_expiry(batch.id)
        output = await self.files.add_output(
            f"file-{stem}-output", f"{batch.id}_output.jsonl", self._parts(plan, done, "out"), key_id, lifetime
        )  # (the order of a file's lines is its chunks' order)
        errors = await self.files.add_output(
            f"file-{stem}-errors", f"{batch.id}_errors.jsonl", self._error_lines(plan, done, final), key_id, lifetime
        )
        ids = {"output_file_id": output.id if output else "", "error_file_id": errors.id if errors else ""}
        fields = {k: v for k, v in ids.items() if v}
        if await self.batches.move(batch.id, (batch.status,), final, **fields):
            log.info("batch %s %s", batch.id, final)
        await self._retire(batch.id)

    async def _retire(self, batch_id: str) -> None:
        """A batch in its final status: its output and error files hold what its chunks' parts held, so the parts
        leave the file store (while the plan still names them; a driver that dies here does it again), then its
        bookkeeping goes."""
        for chunk in await self.batches.plan(batch_id):
            for kind in PART_KINDS:
                await self.store.delete(key_layout.chunk_part_name(batch_id, chunk.index, kind))
        await self.batches.retire(batch_id)

    async def _parts(self, plan: list[ChunkRef], done: set[int], kind: Literal["out", "err"]) -> AsyncIterator[bytes]:
        for chunk in plan:
            if chunk.index in done:
                try:
                    async for block in self.store.read(key_layout.chunk_part_name(chunk.batch_id, chunk.index, kind)):
                        yield block
                except FileNotFoundError:  # its worker could not read the input: every line is an error
                    if kind == "err":
                        async for line in self._unfinished(chunk, *UNREADABLE):
                            yield line

    async def _error_lines(self, plan: list[ChunkRef], done: set[int], final: str) -> AsyncIterator[bytes]:
        """Lines the engine refused, then every line that never ran (expired or cancelled) with its reason."""
        async for block in self._parts(plan, done, "err"):
            yield block
        if final in UNFINISHED:
            for chunk in plan:
                if chunk.index not in done:
                    async for line in self._unfinished(chunk, *UNFINISHED[final]):
                        yield line

    async def _unfinished(self, chunk: ChunkRef, code: str, message: str) -> AsyncIterator[bytes]:
        """An error line for each line of ``chunk``: it did not run, and why."""
        async for raw in lines(self.store.read(chunk.input_file, chunk.start, chunk.end)):
            yield (
                contract.dumps(
                    {
                        "id": f"batch_req_{uuid.uuid4().hex}",
                        "custom_id": json.loads(raw)["custom_id"],
                        "response": None,
                        "error": {"code": code, "message": message},
                    }
                )
                + b"\n"
            )
