"""Running one batch chunk: read its lines from the file store, run them on the engine, store the results.

Where the engine schedules by priority, every line runs behind interactive requests (``BULK_PRIORITY``).
Embedding lines that share their parameters run as ONE engine call (``Engine.embed_many``, the mechanism that also
merges concurrent interactive requests), each line answered as it would be alone (vectors, indices, usage, id).
Chat, completion, score and rerank lines run concurrently, each its own engine request (the engine batches them).

A chunk's results are two files in the store (output lines and error lines, each written whole), then a report
``<index> <ok> <failed> <prompt tokens> <completion tokens>`` on the batch's done list, delivered only while this
worker still holds the chunk. Running a chunk twice (a worker lost mid-chunk) rewrites the same two files; the batch
driver counts each chunk once. A worker that cannot read the chunk's input (a store it cannot reach) reports every
line failed and writes no files; the driver then names those lines in the error file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from conveyor import contract, key_layout
from conveyor.batch_lines import KIND_FOR_URL
from conveyor.contract import ChunkRef, ErrorInfo, JobEnvelope, JobKind
from conveyor.errors import ConveyorError, WorkerLost, error_body
from conveyor.filestore import FileStore, lines
from conveyor.protocol import SCORED_FIELDS
from worker import metrics, scoring
from worker.consumer import Done
from worker.embed_batcher import inputs_of, mergeable, params_key
from worker.engine_share import EngineShare
from worker.engines.base import Engine
from worker.job_source import Delivery
from worker.key_usage import KeyUsage, tokens_in_body

log = logging.getLogger("conveyor.worker")

#: vLLM's priority of batch lines when the engine schedules by priority (lower runs first; interactive ones are 0)
BULK_PRIORITY = 10

#: a batch's done list outlives the batch's window by this long (a driver folds it long before)
DONE_LIST_GRACE_SECONDS = 86_400.0

ClientError = Callable[[str, Exception], ConveyorError]


@dataclass
class Line:
    custom_id: str
    kind: JobKind
    body: dict[str, Any]
    request_id: str


@dataclass
class Result:
    """One line's outcome: the engine's JSON body (status 200) and its usage, or an error."""

    line: Line
    body: bytes | None = None
    error: ErrorInfo | None = None
    #: the line's prompt and completion tokens, from its usage
    tokens: tuple[int, int] = (0, 0)

    def encode(self) -> bytes:
        head = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": self.line.custom_id}
        prefix = json.dumps(head, ensure_ascii=False)[:-1].encode()
        if self.error is not None:
            status, body = self.error.status, contract.dumps(error_body(self.error))
        else:
            status, body = 200, self.body or b"{}"
        rid = self.line.request_id
        return prefix + b',"response":{"status_code":%d,"request_id":"%s","body":%s},"error":null}\n' % (
            status,
            rid.encode(),
            body,
        )


class ChunkRunner:
    def __init__(
        self, engine: Engine, store: FileStore, client_error: ClientError, model: str, share: EngineShare
    ) -> None:
        self.model = model
        self.engine = engine
        self.share = share
        self.store = store
        self.client_error = client_error

    async def run(self, envelope: JobEnvelope, chunk: ChunkRef, lost: WorkerLost | None = None) -> Done:
        """Run the chunk (or, when its workers were lost too often, answer every line with ``lost``)."""
        report = key_layout.batch_done_key(chunk.batch_id)
        ttl = max(chunk.expires_at - time.time(), 0) + DONE_LIST_GRACE_SECONDS
        try:
            batch_lines = [line async for line in self._read(chunk)]
        except Exception as exc:  # this worker cannot reach the batch's input: its lines fail, none is lost
            log.error(
                "batch %s chunk %d: cannot read %s from the file store (%s: %s); is CONVEYOR_FILES_URL the "
                "gateway's? Its %d lines are reported failed.",
                *(chunk.batch_id, chunk.index, chunk.input_file, type(exc).__name__, exc, chunk.lines),
            )
            counts = f"{chunk.index} 0 {chunk.lines}"
            return Done(envelope.deadline, Delivery(report, counts.encode(), ttl), KeyUsage.of(envelope, 0))
        if lost is not None:
            results = [Result(line, error=lost.info()) for line in batch_lines]
        else:
            results = await self._execute(batch_lines)
        ok = [r.encode() for r in results if r.error is None]
        failed = [r.encode() for r in results if r.error is not None]
        await self.store.write(key_layout.chunk_part_name(chunk.batch_id, chunk.index, "out"), _blocks(ok))
        await self.store.write(key_layout.chunk_part_name(chunk.batch_id, chunk.index, "err"), _blocks(failed))
        metrics.BULK_LINES.labels(self.model, "ok").inc(len(ok))
        metrics.BULK_LINES.labels(self.model, "failed").inc(len(failed))
        prompt, completion = (sum(r.tokens[i] for r in results if r.error is None) for i in (0, 1))
        counts = f"{chunk.index} {len(ok)} {len(failed)} {prompt} {completion}"
        usage = KeyUsage.of(envelope, len(ok), prompt, completion)
        return Done(envelope.deadline, Delivery(report, counts.encode(), ttl), usage)

    async def _read(self, chunk: ChunkRef) -> AsyncIterator[Line]:
        number = chunk.first_line
        behind = self.engine.schedules_by_priority()
        async for raw in lines(self.store.read(chunk.input_file, chunk.start, chunk.end)):
            if raw.strip():  # the gateway validated every line when the batch was created
                item = json.loads(raw)
                body = item["body"] | ({"priority": BULK_PRIORITY} if behind and "priority" not in item["body"] else {})
                yield Line(item["custom_id"], KIND_FOR_URL[item["url"]], body, f"{chunk.batch_id}-{number}")
            number += 1

    async def _execute(self, batch_lines: list[Line]) -> list[Result]:
        embeddings = [line for line in batch_lines if line.kind is JobKind.EMBEDDING]
        others = [line for line in batch_lines if line.kind is not JobKind.EMBEDDING]
        groups: dict[bytes, list[Line]] = {}
        for line in embeddings:
            groups.setdefault(params_key(line.body), []).append(line)
        done = await asyncio.gather(
            *(self._embed_group(group) for group in groups.values()),
            *(self._one_each(others),),
        )
        by_line = {id(r.line): r for results in done for r in results}
        return [by_line[id(line)] for line in batch_lines]

    async def _one_each(self, batch_lines: list[Line]) -> list[Result]:
        return list(await asyncio.gather(*(self._one(line) for line in batch_lines)))

    async def _one(self, line: Line) -> Result:
        metrics.BULK_CALLS.labels(self.model, "no").inc()
        try:
            async with self.share.hold(_inputs(line)):
                raw = contract.json_bytes(await self._run(line))
        except Exception as exc:  # EngineDead (raised by client_error) propagates: the chunk is handed back
            return Result(line, error=self.client_error(line.request_id, exc).info())
        return _answered(line, raw)

    async def _run(self, line: Line) -> bytes | dict[str, Any]:
        """One line alone; a score or rerank line as the API answers it (``worker.scoring.score``)."""
        if line.kind.scores:
            return await scoring.score(self.engine, line.kind, line.body, line.request_id, self._embed_one)
        return await self.engine.run(line.kind, line.body, line.request_id)

    async def _embed_one(self, body: dict[str, Any], request_id: str) -> bytes | dict[str, Any]:
        return await self.engine.run(JobKind.EMBEDDING, body, request_id)

    async def _embed_group(self, group: list[Line]) -> list[Result]:
        """Lines with the same parameters: as few engine calls as the engine share allows, each answered per line."""
        results: list[Result] = []
        while len(results) < len(group):
            start = len(results)
            end = start + self.share.call_size(len(group) - start)
            results += await self._embed_merged(group[start:end])
        return results

    async def _embed_merged(self, group: list[Line]) -> list[Result]:
        """One engine call for the inputs of ``group`` (``Engine.embed_many``); each line gets its own answer."""
        if len(group) == 1 or not all(mergeable(line.body) for line in group):
            return await self._one_each(group)
        metrics.BULK_CALLS.labels(self.model, "yes").inc()
        async with self.share.hold(sum(len(inputs_of(line.body["input"])) for line in group)):
            answers = await self.engine.embed_many([x.body for x in group], [x.request_id for x in group])
        results = []
        for line, answer in zip(group, answers, strict=True):
            if isinstance(answer, Exception):  # EngineDead (raised by client_error) propagates: the chunk goes back
                results.append(Result(line, error=self.client_error(line.request_id, answer).info()))
            else:
                results.append(_answered(line, contract.json_bytes(answer)))
        return results


def _inputs(line: Line) -> int:
    """How many inputs a line gives the engine: an embedding's, the texts a score or rerank compares, else one."""
    if line.kind is JobKind.EMBEDDING:
        return len(inputs_of(line.body["input"]))
    if line.kind.scores:
        sides = (line.body[name] for name in SCORED_FIELDS if name in line.body)
        return sum(len(side) if isinstance(side, list) else 1 for side in sides)
    return 1


def _answered(line: Line, raw: bytes) -> Result:
    return Result(line, body=raw, tokens=tokens_in_body(raw))


async def _blocks(encoded: list[bytes]) -> AsyncIterator[bytes]:
    yield b"".join(encoded)
