"""Running one claimed job on the engine and producing its answer.

Every job is answered exactly once: a non-streamed job's answer is returned for the consumer to deliver (only while
this worker still holds the job); a stream's frames are published as they come. A job whose workers were lost
``max_tries`` times is answered ``worker_lost`` instead of being run again; a job cancelled by its client, by
shutdown or by losing its lease is not answered here at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from conveyor import contract, key_layout, logs
from conveyor.contract import JobEnvelope, JobKind, Reply, StreamFrame, StreamProgress
from conveyor.errors import ConveyorError, DeadlineExceeded, EngineFailure, InvalidRequest, WorkerLost
from conveyor.filestore import FileStore, open_store
from conveyor.outage import REDIS_DOWN
from worker import key_usage, metrics
from worker.bulk import ChunkRunner
from worker.consumer import Done, EngineDead, LeaseLost
from worker.embed_batcher import EmbeddingBatcher
from worker.engine_share import BUSY_INPUTS, EngineShare
from worker.engines.base import Engine, Piece, Resume
from worker.job_source import Claim, Delivery, Fence
from worker.key_usage import KeyUsage
from worker.migration import Cut, Migration, continued_body

log = logging.getLogger("conveyor.worker")

#: how loudly a job that did not succeed is logged: a cancellation is the client's choice, an error is usually the
#: request's fault (the engine refused it), an expiry means the fleet is too slow for the deadline
OUTCOME_LOG_LEVEL = {"cancelled": logging.INFO, "error": logging.INFO, "expired": logging.WARNING}
#: a non-streamed generation's progress is recorded this often (a continuation regenerates what came after)
RECORD_SECONDS = 0.5


class JobRunner:
    def __init__(
        self,
        redis: Redis,
        engine: Engine,
        model: str,
        max_tries: int = 3,
        store: FileStore | None = None,
        share: EngineShare | None = None,
        batcher: EmbeddingBatcher | None = None,
        migration: Migration | None = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.max_tries = max_tries
        self.migration = migration or Migration(redis, model)
        self.share = share or EngineShare(BUSY_INPUTS)
        self.batcher = batcher or EmbeddingBatcher(engine, model)
        self.bulk = ChunkRunner(engine, store or open_store(None), self._client_error, model, self.share)

    async def job(self, claim: Claim) -> Done:
        """The consumer's handler: check the envelope, then run it (or answer why not)."""
        try:
            envelope = JobEnvelope.model_validate(claim.envelope)
        except ValidationError as exc:
            log.error("job %s: refusing a malformed envelope: %s", claim.job_id, exc.errors()[:1])
            raw = claim.envelope
            return await self._answer(
                claim.job_id,
                str(raw.get("reply_to", "")),
                bool(raw.get("stream")),
                InvalidRequest("malformed job envelope"),
                time.time() + 60,
            )
        if envelope.v != contract.ENVELOPE_VERSION:
            error = EngineFailure(
                f"job envelope v{envelope.v} is not understood by this worker (v{contract.ENVELOPE_VERSION})",
                code="envelope_version",
            )
            return await self._answer_error(envelope, error)
        if claim.tries > self.max_tries:
            metrics.labelled(metrics.JOBS, self.model, _kind(envelope), "worker_lost").inc()
            log.warning("job %s: its worker was lost %d times; answering worker_lost", claim.job_id, self.max_tries)
            lost = WorkerLost(f"the workers running this request were lost {self.max_tries} times; it was not retried")
            if envelope.chunk is not None:
                return await self.bulk.run(envelope, envelope.chunk, lost)
            return await self._answer_error(envelope, lost)
        with logs.about(envelope.request_id, envelope.model):
            if claim.tries > 1:
                log.info("running again (try %d) after its worker was lost", claim.tries)
            return await self.run(envelope, claim.fence, claim.progress)

    async def run(self, envelope: JobEnvelope, fence: Fence | None = None, progress: bool = True) -> Done:
        """Run a job; ``progress``: it may have been cut on another worker (False when its claim found nothing
        recorded: no cut is read)."""
        kind = _kind(envelope)
        started = time.time()
        metrics.labelled(metrics.QUEUE_WAIT, self.model).observe(max(0.0, started - envelope.created))
        left = envelope.seconds_left(started)
        if left <= 0:
            metrics.labelled(metrics.JOBS, self.model, kind, "expired").inc()
            log.warning("expired in the queue: its deadline passed before a worker could start it")
            error = DeadlineExceeded("the request's deadline passed before a worker could start it")
            return await self._answer_error(envelope, error)
        metrics.labelled(metrics.RUNNING_JOBS, self.model).inc()
        outcome = "cancelled"
        try:
            if envelope.chunk is not None:
                done = await self.bulk.run(envelope, envelope.chunk)
                outcome = "ok"
                return done
            async with self.share.interactive():
                if envelope.stream:
                    outcome, tokens = await self._stream(envelope, left, fence, progress)
                    return Done(envelope.deadline, usage=KeyUsage.of(envelope, int(outcome == "ok"), *tokens))
                if self._continuable(envelope):
                    outcome, reply = await self._generate(envelope, left, fence, progress)
                else:
                    outcome, reply = await self._complete(envelope, left)
            tokens = key_usage.tokens_in_body(reply.body) if envelope.tenant and reply.body else (0, 0)
            usage = KeyUsage.of(envelope, int(outcome == "ok"), *tokens)
            return Done(envelope.deadline, _delivery(envelope.reply_to, reply), usage)
        except EngineDead:
            outcome = "engine_dead"
            raise
        finally:
            metrics.labelled(metrics.RUNNING_JOBS, self.model).dec()
            metrics.labelled(metrics.JOBS, self.model, kind, outcome).inc()
            metrics.labelled(metrics.JOB_DURATION, self.model, kind).observe(time.time() - started)
            if outcome != "ok":  # one line per job that did not succeed (an engine failure also logged its cause)
                level = OUTCOME_LOG_LEVEL.get(outcome, logging.WARNING)
                log.log(level, "%s job ended %s after %.2f s", kind, outcome, time.time() - started)

    async def _complete(self, envelope: JobEnvelope, left: float) -> tuple[str, Reply]:
        try:
            async with asyncio.timeout(left):
                if envelope.kind is JobKind.EMBEDDING:  # concurrent ones with the same parameters share a call
                    body = await self.batcher.embed(envelope.body, envelope.request_id)
                elif envelope.kind.scores:  # plain ones too, as embeddings of their texts
                    body = await self.batcher.score(envelope.kind, envelope.body, envelope.request_id)
                else:
                    body = await self.engine.run(envelope.kind, envelope.body, envelope.request_id)
        except Exception as exc:  # CancelledError is not an Exception: it propagates
            error = self._client_error(envelope.request_id, exc)
            return _outcome(error), Reply(envelope.request_id, error=error.info())
        return "ok", Reply(envelope.request_id, body=contract.json_bytes(body))

    async def _stream(
        self, envelope: JobEnvelope, left: float, fence: Fence | None, progress: bool
    ) -> tuple[str, tuple[int, int]]:
        """Publish the stream's frames, each with what it adds to the completion (``worker.migration``), going on
        where an earlier worker was cut; returns the outcome and, for a job with an API key, the engine's usage (asked
        of the engine even when the client did not ask for it, and then not passed on)."""
        rid, body, counted = envelope.request_id, envelope.body, envelope.tenant is not None
        asked = bool((body.get("stream_options") or {}).get("include_usage"))
        if counted and not asked:
            body = body | {"stream_options": (body.get("stream_options") or {}) | {"include_usage": True}}
        cut = await self.migration.cut(rid, envelope.deadline) if progress else None
        seq, tokens = (cut.progress.seq if cut else 0), (0, 0)
        try:
            resume, body = self._continuation(envelope, cut, body)
            why = self.engine.unresumable(envelope.kind, body)
            async with asyncio.timeout(left):
                pieces = self.engine.stream(envelope.kind, body, rid, resume) if resume is not DONE else _nothing()
                async for piece in pieces:
                    found = key_usage.usage_chunk(piece.chunk) if counted else None
                    if found is not None:
                        tokens = key_usage.tokens_of(found[0])
                        if found[1] and not asked:
                            continue
                    entry = StreamProgress.entry(
                        None if why else piece.token_ids, piece.prompt_token_ids, why or "", None, *piece.marks
                    )
                    await self._send(fence, rid, StreamFrame.chunk(seq, piece.chunk), envelope.deadline, entry)
                    seq += 1
        except LeaseLost:
            raise
        except Exception as exc:
            error = self._client_error(rid, exc)
            if isinstance(error, WorkerLost) and cut is not None:  # refused: its key pays for what was sent
                tokens = (len(cut.progress.prompt_token_ids or ()), len(cut.progress.token_ids))
            await self._send(fence, rid, StreamFrame.failure(seq, error.info()), envelope.deadline)
            return _outcome(error), tokens
        await self._send(fence, rid, StreamFrame(seq, "end"), envelope.deadline)
        return "ok", tokens

    def _continuable(self, envelope: JobEnvelope) -> bool:
        """A non-streamed generation that runs as a stream, so that another worker can continue it."""
        kind, body = envelope.kind, envelope.body
        return kind.generates and self.migration.enabled and not self.engine.unresumable(kind, body)

    async def _generate(
        self, envelope: JobEnvelope, left: float, fence: Fence | None, progress: bool
    ) -> tuple[str, Reply]:
        """A non-streamed chat or completion run as a stream whose chunks (with their tokens) are recorded every
        ``RECORD_SECONDS``: a worker that continues it after a cut regenerates at most what was not recorded, and the
        answer is built from every chunk at the end (``Engine.answer``)."""
        rid, kind = envelope.request_id, envelope.kind
        body = envelope.body | {"stream_options": {"include_usage": True}}
        try:
            cut = await self.migration.cut(rid, envelope.deadline) if progress else None
        except REDIS_DOWN:  # unreadable: run it from the start, recording nothing (nothing was sent of it)
            cut, recorded = None, -1
        else:
            recorded = cut.progress.seq if cut else 0
        chunks = [orjson.loads(chunk) for chunk in cut.progress.chunks] if cut else []
        try:
            resume, body = self._continuation(envelope, cut, body)
            pending: list[Piece] = []  # not recorded yet (their entries are written only when recorded)
            last = time.monotonic()
            async with asyncio.timeout(left):
                pieces = self.engine.stream(kind, body, rid, resume) if resume is not DONE else _nothing()
                async for piece in pieces:
                    chunks.append(piece.chunk if isinstance(piece.chunk, dict) else orjson.loads(piece.chunk))
                    pending.append(piece)
                    if recorded >= 0 and time.monotonic() - last >= RECORD_SECONDS:
                        last = time.monotonic()
                        entries = [_recorded(p) for p in pending]
                        with contextlib.suppress(*REDIS_DOWN):  # an outage: recorded later, the answer still comes
                            await self.migration.record(fence, rid, entries, recorded, envelope.deadline)
                            recorded, pending = recorded + len(pending), []
        except LeaseLost:
            raise
        except Exception as exc:  # CancelledError is not an Exception: it propagates
            error = self._client_error(rid, exc)
            return _outcome(error), Reply(rid, error=error.info())
        return "ok", Reply(rid, body=contract.json_bytes(self.engine.answer(kind, chunks)))

    def _continuation(
        self, envelope: JobEnvelope, cut: Cut | None, body: dict[str, Any]
    ) -> tuple[Resume | None, dict[str, Any]]:
        """How this run goes: from the start (None), on from a cut (its ``Resume`` and the body with its token limit
        less what was sent), or nothing left but the end (``DONE``: the finish and the usage were sent already)."""
        if cut is None:
            return None, body
        resume = self._resume(envelope, cut)
        wanted_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if cut.progress.finished and (cut.progress.usage_sent or not wanted_usage):
            return DONE, body
        return resume, continued_body(body, len(resume.token_ids))

    def _resume(self, envelope: JobEnvelope, cut: Cut) -> Resume:
        """Go on with a generation cut on another worker, or say (as its next event, or its answer) why it cannot."""
        refusal = self.migration.refusal(cut)
        if refusal is not None:
            metrics.MIGRATIONS.labels(self.model, "refused").inc()
            raise WorkerLost(f"The worker serving this request was lost after {cut.progress.seq} chunks and {refusal}.")
        metrics.MIGRATIONS.labels(self.model, "resumed").inc()
        log.info(
            "continuing a generation cut on another worker after %d chunks (%d tokens; migration %d)",
            cut.progress.seq,
            len(cut.progress.token_ids),
            cut.migrations,
        )
        return Resume(cut.progress.token_ids, cut.progress.prompt_token_ids, cut.progress.finished)

    def _client_error(self, request_id: str, exc: Exception) -> ConveyorError:
        """What the client is told about ``exc``; raises ``EngineDead`` when the engine died under the job."""
        if isinstance(exc, ConveyorError):
            return exc
        if isinstance(exc, TimeoutError):
            return DeadlineExceeded("the request's deadline passed while it ran")
        if isinstance(exc, RedisError | OSError):  # publishing failed: nobody can be told; the consumer logs it
            raise exc
        if not self.engine.alive():
            raise EngineDead(str(exc)) from exc
        log.error("job %s failed in the engine: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
        return EngineFailure(f"the engine failed on this request (request id {request_id})")

    async def _answer_error(self, envelope: JobEnvelope, error: ConveyorError) -> Done:
        """Answer a job that did not run; its API key gets its place and its token charge back."""
        done = await self._answer(envelope.request_id, envelope.reply_to, envelope.stream, error, envelope.deadline)
        return Done(done.deadline, done.delivery, KeyUsage.of(envelope, 0))

    async def _answer(
        self, request_id: str, reply_to: str, stream: bool, error: ConveyorError, deadline: float
    ) -> Done:
        """Answer a job with an error without running it."""
        if stream:  # numbered on from what an earlier worker sent of it
            cut = await self.migration.cut(request_id, deadline)
            frame = StreamFrame.failure(cut.progress.seq if cut else 0, error.info())
            await self._send(None, request_id, frame, deadline)
            return Done(deadline)
        return Done(deadline, _delivery(reply_to, Reply(request_id, error=error.info())))

    async def _send(
        self, fence: Fence | None, request_id: str, frame: StreamFrame, deadline: float, entry: bytes = b""
    ) -> None:
        await self.migration.publish(fence, request_id, frame.seq, frame.encode(), entry, deadline)
        metrics.labelled(metrics.STREAM_MESSAGES, self.model).inc()


#: a continuation with nothing left to generate: the cut came after the finish and the usage were sent
DONE = Resume(())


def _recorded(piece: Piece) -> bytes:
    """A non-streamed generation's piece as its progress entry: its tokens, and its chunk to build the answer from."""
    raw = contract.json_bytes(piece.chunk)
    return StreamProgress.entry(piece.token_ids, piece.prompt_token_ids, "", raw, *piece.marks)


async def _nothing() -> AsyncIterator[Piece]:
    return
    yield


def _delivery(reply_to: str, reply: Reply) -> Delivery | None:
    """The answer pushed to the inbox of the gateway that enqueued the job (none if it named no inbox)."""
    return Delivery(key_layout.inbox_key(reply_to), reply.encode()) if reply_to else None


def _kind(envelope: JobEnvelope) -> str:
    """The job-kind label: a batch chunk is ``bulk`` whatever its lines ask for."""
    return "bulk" if envelope.chunk is not None else envelope.kind.value


def _outcome(error: ConveyorError) -> str:
    return "expired" if isinstance(error, DeadlineExceeded) else "error"
