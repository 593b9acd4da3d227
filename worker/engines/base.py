"""The engine interface a worker drives. One engine per worker process, one model per engine."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from conveyor.contract import JobKind
from worker import responses


def token_limit(body: dict[str, Any]) -> int | None:
    """The request's completion-token limit (``max_completion_tokens``, else ``max_tokens``), None when unset; a
    continuation's may be 0 (cut after its last token)."""
    for field in ("max_completion_tokens", "max_tokens"):
        if body.get(field) is not None:
            return int(body[field])
    return None


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of a stream, and the token ids it adds to the completion (choice 0): ``None`` when the engine cannot
    say, and the stream then cannot be continued elsewhere after it. ``prompt_token_ids`` once the engine reports
    what the prompt rendered to (vLLM: with the first chunk)."""

    chunk: dict[str, Any] | str
    token_ids: tuple[int, ...] | None = ()
    prompt_token_ids: tuple[int, ...] | None = None
    #: the chunk carries the finish reason; it carries the usage
    finished: bool = False
    usage: bool = False

    @property
    def marks(self) -> tuple[bool, bool]:
        """(finished, usage), as ``StreamProgress.entry`` takes them."""
        return self.finished, self.usage


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a stream that was cut on another worker goes on: the tokens already sent to the client (and the prompt's
    token ids, when the engine reported them). The engine continues from the prompt plus these tokens and yields only
    what comes after, as the original stream would have gone on: no role chunk again, its usage counting the whole
    request (prompt as first rendered, every completion token once)."""

    token_ids: tuple[int, ...]
    prompt_token_ids: tuple[int, ...] | None = None
    #: the finish reason was sent already: only the usage chunk (when asked for) is left
    finished: bool = False


class Engine(ABC):
    """An inference engine serving one model.

    ``run`` returns a complete OpenAI response body (score and rerank: vLLM's shapes); ``stream`` yields OpenAI
    chunks (``chat.completion.chunk`` or ``text_completion``) in order, including the final usage chunk when
    ``stream_options.include_usage`` asks for it. Either may give dicts or their JSON text, which is relayed to the
    client untouched. Both raise ``conveyor.errors.ConveyorError`` subclasses for problems the client should see (a
    bad sampling parameter is ``InvalidRequest``).
    Cancelling the awaiting task must abort the request inside the engine.
    """

    #: capabilities advertised to the gateway: "generate" (chat + completions), "embed", "score" (score + rerank)
    capabilities: frozenset[str]
    #: longest prompt + completion the engine accepts, if known
    max_model_len: int | None = None

    @property
    @abstractmethod
    def concurrency(self) -> int:
        """How many requests the engine batches at once: the worker runs this many jobs concurrently."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model. Called once before the worker takes jobs."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

    @abstractmethod
    async def run(self, kind: JobKind, body: dict[str, Any], request_id: str) -> dict[str, Any] | bytes:
        """Serve one non-streamed request."""

    @abstractmethod
    def stream(
        self, kind: JobKind, body: dict[str, Any], request_id: str, resume: Resume | None = None
    ) -> AsyncIterator[Piece]:
        """Serve one streamed request (chat or completion), or go on with one cut elsewhere (``resume``; only for a
        request ``unresumable`` has no objection to). ``body``'s ``max_tokens`` already counts what was sent."""

    def answer(self, kind: JobKind, chunks: list[dict[str, Any]]) -> dict[str, Any] | bytes:
        """The non-streamed response these chunks of one choice stream (``run``'s answer, built from ``stream``'s
        chunks: a non-streamed generation runs as a stream so that another worker can continue it)."""
        return responses.from_chunks(kind, chunks)

    def unresumable(self, kind: JobKind, body: dict[str, Any]) -> str | None:
        """Why a stream of this request could not be continued exactly on another worker, or None when it can."""
        return "this engine cannot continue a generation"

    def schedules_by_priority(self) -> bool:
        """True when requests may carry a ``priority`` (vLLM: ``scheduling_policy="priority"``): batch lines then
        run behind interactive requests inside the engine too."""
        return False

    def scores_by_embedding(self) -> bool:
        """True when this engine's score and rerank answers are the cosine similarities of its own embeddings of the
        texts (vLLM's bi-encoder scoring), so that ``worker.scoring`` may answer plain ones from an embedding call
        shared with other jobs."""
        return False

    async def embed_many(
        self, bodies: list[dict[str, Any]], request_ids: list[str]
    ) -> list[dict[str, Any] | bytes | Exception]:
        """Embedding requests with the same parameters (all but ``input``, texts only) as one engine call, each
        answered exactly as it would be alone: its answer, or the error it would get alone. Raises only when the
        engine failed under the whole call. This default runs each alone."""
        results = await asyncio.gather(
            *(self.run(JobKind.EMBEDDING, body, rid) for body, rid in zip(bodies, request_ids, strict=True)),
            return_exceptions=True,
        )
        out: list[dict[str, Any] | bytes | Exception] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            out.append(result)
        return out

    def running_requests(self) -> int:
        """Requests currently inside the engine (for metrics and cancellation tests)."""
        return 0

    def alive(self) -> bool:
        """False once the engine has died (its process gone, its loop ended): the worker then stops."""
        return True

    def progress(self) -> int:
        """A count that grows whenever the engine makes progress (a step, a token, an answer). While requests are
        running and it stops growing for ``engine_stall_timeout`` seconds, the engine counts as hung."""
        return 0
