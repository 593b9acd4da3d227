"""Concurrent embedding jobs that share their parameters run as ONE engine call (``Engine.embed_many``); so do plain
score and rerank jobs on an engine that scores with its embeddings (``score``: an embedding of their texts,
``worker.scoring``).

Each job hands its request to ``EmbeddingBatcher.embed`` and awaits its own answer. Jobs whose bodies are equal but
for ``input`` (``params_key``) and whose inputs are texts join a group; the group runs when the event
loop has finished the turn in which its first job arrived (jobs claimed together start in the same turn, so they
merge without anyone waiting), or after ``wait`` seconds when that is set, or at once when it holds ``max_inputs``
inputs. A job alone runs alone, one loop turn later: concurrency 1 pays nothing.

``embed_many`` answers each request exactly as it would be answered alone (its vectors, usage and id), or with its
own error. A job cancelled while its group waits leaves the group; one cancelled while its group runs is dropped from
the answers (its few engine steps finish with the others').
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import orjson

from conveyor.contract import JobKind
from worker import metrics, scoring
from worker.engines.base import Engine

#: the default of ``CONVEYOR_WORKER_EMBED_BATCH_MAX_INPUTS``
MAX_INPUTS = 256


@dataclass
class _Group:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    answers: list[asyncio.Future[bytes | dict[str, Any]]] = field(default_factory=list)
    inputs: int = 0
    timer: asyncio.Handle | None = None


def inputs_of(value: Any) -> list[Any]:
    """An embedding request's inputs: one text or token array, or a list of them."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(x, int) for x in value)):
        return [value]
    return list(value)


def params_key(body: dict[str, Any]) -> bytes:
    """Requests with the same key (every field but ``input``) may share an engine call."""
    params = {k: v for k, v in body.items() if k != "input"}
    try:
        return orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # e.g. an extra field's integer past 64 bits, which the standard library writes
        return json.dumps(params, sort_keys=True).encode()


def mergeable(body: dict[str, Any]) -> bool:
    """A request whose inputs are texts (token-id inputs and chat-style requests run alone)."""
    raw = body.get("input")
    return isinstance(raw, str) or (isinstance(raw, list) and bool(raw) and all(isinstance(x, str) for x in raw))


class EmbeddingBatcher:
    def __init__(self, engine: Engine, model: str, wait: float = 0.0, max_inputs: int = MAX_INPUTS) -> None:
        self.engine = engine
        self.model = model
        self.wait = wait
        self.max_inputs = max_inputs
        self._open: dict[bytes, _Group] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def embed(self, body: dict[str, Any], request_id: str) -> bytes | dict[str, Any]:
        """The answer to one embedding request, from an engine call it may share with others."""
        if not mergeable(body):
            metrics.labelled(metrics.EMBED_CALL_REQUESTS, self.model).observe(1)
            return await self.engine.run(JobKind.EMBEDDING, body, request_id)
        key = params_key(body)
        group = self._open.get(key)
        if group is None:
            group = self._open[key] = _Group()
            loop = asyncio.get_running_loop()
            if self.wait > 0:
                group.timer = loop.call_later(self.wait, self._close, key, group)
            else:
                group.timer = loop.call_soon(self._close, key, group)
        answer: asyncio.Future[bytes | dict[str, Any]] = asyncio.get_running_loop().create_future()
        group.bodies.append(body)
        group.request_ids.append(request_id)
        group.answers.append(answer)
        group.inputs += len(inputs_of(body["input"]))
        if group.inputs >= self.max_inputs:
            self._close(key, group)
        return await answer

    async def score(self, kind: JobKind, body: dict[str, Any], request_id: str) -> bytes | dict[str, Any]:
        """The answer to a score or rerank request; a plain one on an engine that scores with its embeddings is an
        embedding of its texts here, which may share a call with other jobs (``worker.scoring.score``)."""
        return await scoring.score(self.engine, kind, body, request_id, self.embed)

    def _close(self, key: bytes, group: _Group) -> None:
        """Stop the group taking jobs and run it (jobs cancelled while it waited are left out)."""
        if self._open.get(key) is group:
            del self._open[key]
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        live = [i for i, answer in enumerate(group.answers) if not answer.done()]
        if not live:
            return
        task = asyncio.create_task(
            self._run(
                [group.bodies[i] for i in live],
                [group.request_ids[i] for i in live],
                [group.answers[i] for i in live],
            )
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(
        self,
        bodies: list[dict[str, Any]],
        request_ids: list[str],
        answers: list[asyncio.Future[bytes | dict[str, Any]]],
    ) -> None:
        metrics.labelled(metrics.EMBED_CALL_REQUESTS, self.model).observe(len(bodies))
        try:
            results = await self.engine.embed_many(bodies, request_ids)
        except Exception as exc:  # the engine failed under the whole call
            for answer in answers:
                if not answer.done():
                    answer.set_exception(exc)
            return
        except BaseException:  # the worker is stopping: so are the jobs waiting for this call
            for answer in answers:
                answer.cancel()
            raise
        for answer, result in zip(answers, results, strict=True):
            if answer.done():  # its job was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                answer.set_exception(result)
            else:
                answer.set_result(result)
