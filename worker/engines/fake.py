"""FakeEngine: a deterministic stand-in for vLLM. A test and benchmark tool only, never a default.

It answers in OpenAI's shapes with text and vectors derived from a hash of the input, so tests can check that what
comes out is what this input produces, and benchmarks can measure Conveyor's own overhead without a model.

Faults on command, for the fault tests: a request whose body has ``"fake_fault": "die"`` kills the engine (every
running and later request fails, ``alive()`` turns false); ``"hang"`` freezes it (nothing running or new makes
progress any more, as a wedged GPU would).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from conveyor.contract import JobKind
from conveyor.errors import ConveyorError, InvalidRequest
from worker import scoring
from worker.embed_batcher import inputs_of
from worker.engines.base import Engine, Piece, Resume, token_limit

FAULT_FIELD = "fake_fault"


class EngineDiedError(RuntimeError):
    """What requests on a dead fake engine raise (vLLM raises its EngineDeadError)."""


VOCAB = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima")
DEFAULT_MAX_TOKENS = 16
MAX_MODEL_LEN = 2048


def fake_token_ids(prompt: str, count: int, before: Sequence[int] = ()) -> list[int]:
    """The token ids the fake engine generates after ``prompt`` and the tokens ``before``: each one picked by a hash
    of the prompt and every token before it, as a model's next token depends on all of its context (so a
    continuation from a wrong, missing or repeated token goes elsewhere from there on)."""
    state = hashlib.sha256(prompt.encode())
    for token in before:
        state.update(bytes([token]))
    out: list[int] = []
    for _ in range(count):
        token = state.copy().digest()[0] % len(VOCAB)
        state.update(bytes([token]))
        out.append(token)
    return out


def fake_tokens(prompt: str, count: int) -> list[str]:
    """The completion the fake engine gives ``prompt``: ``count`` words."""
    return [" " + VOCAB[token] for token in fake_token_ids(prompt, count)]


def fake_vector(item: str | list[int], dim: int) -> list[float]:
    """The unit vector the fake engine gives one input (a text or a token array)."""
    seed = hashlib.sha256(repr(item).encode()).digest()
    raw = [(seed[i % len(seed)] ^ (i * 37 % 256)) / 127.5 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def _prompt_text(kind: JobKind, body: dict[str, Any]) -> str:
    if kind is JobKind.CHAT:
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in body.get("messages", []))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else repr(prompt)


def _burn(cpu_seconds: float) -> None:
    """Spend this much CPU time in this thread (not wall time: under contention it takes longer, as compute does)."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def _item_tokens(item: str | list[int]) -> int:
    """The fake engine's token count of one embedding input: its words, or its token ids."""
    return len(item.split()) if isinstance(item, str) else len(item)


class FakeEngine(Engine):
    def __init__(
        self,
        model: str,
        *,
        embed: bool = False,
        token_delay: float = 0.0,
        embedding_dim: int = 32,
        concurrency: int = 64,
        cpu_per_input: float = 0.0,
    ) -> None:
        self.model = model
        # an embedding model scores too, as vLLM scores with one (cosine similarity of the embeddings)
        self.capabilities = frozenset({"embed", "score"} if embed else {"generate"})
        self.max_model_len = MAX_MODEL_LEN
        self.token_delay = token_delay
        self.embedding_dim = embedding_dim
        #: CPU seconds each embedding input burns, in the worker's own thread (a compute-bound engine, for scale-out)
        self.cpu_per_input = cpu_per_input
        self._concurrency = concurrency
        self._running = 0
        self._progress = 0
        self._dead = False
        self._hung = asyncio.Event()

    @property
    def concurrency(self) -> int:
        return self._concurrency

    def running_requests(self) -> int:
        return self._running

    def alive(self) -> bool:
        return not self._dead

    def progress(self) -> int:
        return self._progress

    async def _step(self) -> None:
        """One engine step: where faults take effect."""
        if self._hung.is_set():
            await asyncio.Future()  # never resolves: hung, as a wedged device would be
        if self._dead:
            raise EngineDiedError("the fake engine is dead")
        self._progress += 1

    async def _fault(self, body: dict[str, Any]) -> None:
        fault = body.get(FAULT_FIELD)
        if fault == "die":
            self._dead = True
        elif fault == "hang":
            self._hung.set()
        await self._step()

    async def run(self, kind: JobKind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        self._running += 1
        try:
            await self._fault(body)
            if kind is JobKind.EMBEDDING:
                return self._embed(body)
            if kind.scores:
                return self._score(kind, body, request_id)
            choices: list[list[str]] = [[] for _ in range(int(body.get("n") or 1))]
            async for index, token in self._generate(kind, body):
                choices[index].append(" " + VOCAB[token])
            return self._response(kind, body, request_id, ["".join(c) for c in choices])
        finally:
            self._running -= 1

    def unresumable(self, kind: JobKind, body: dict[str, Any]) -> str | None:
        return "n > 1: several choices cannot be continued" if int(body.get("n") or 1) > 1 else None

    async def stream(
        self, kind: JobKind, body: dict[str, Any], request_id: str, resume: Resume | None = None
    ) -> AsyncIterator[Piece]:
        self._prompt_tokens(kind, body)  # like vLLM: a bad request fails before the first chunk
        self._running += 1
        try:
            await self._fault(body)
            base = self._base(kind, body, request_id, chunk=True)
            n = int(body.get("n") or 1)
            ids = None if n > 1 else ()  # with several choices interleaved no one completion's tokens are known
            if not (resume and resume.finished):
                if kind is JobKind.CHAT and resume is None:
                    for i in range(n):
                        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield Piece(base | {"choices": [role]}, ids)
                async for index, token in self._generate(kind, body, resume):
                    choice = self._choice(kind, index, " " + VOCAB[token], None, chunk=True)
                    yield Piece(base | {"choices": [choice]}, None if n > 1 else (token,))
                finish = self._finish_reason(body)
                for i in range(n):
                    yield Piece(base | {"choices": [self._choice(kind, i, "", finish, chunk=True)]}, ids, finished=True)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield Piece(base | {"choices": [], "usage": self._usage(kind, body, resume)}, ids, usage=True)
        finally:
            self._running -= 1

    # --- generation -------------------------------------------------------------------------------------------

    def _max_tokens(self, body: dict[str, Any], resume: Resume | None = None) -> int:
        """Tokens to generate now: a continuation's ``max_tokens`` already counts what was sent; without one, the
        default is for the whole completion."""
        explicit = token_limit(body)
        return explicit if explicit is not None else DEFAULT_MAX_TOKENS - len(resume.token_ids if resume else ())

    def _finish_reason(self, body: dict[str, Any]) -> str:
        return "stop" if token_limit(body) is None else "length"

    def _prompt_tokens(self, kind: JobKind, body: dict[str, Any]) -> int:
        count = len(_prompt_text(kind, body).split())
        if count + self._max_tokens(body) > MAX_MODEL_LEN:
            raise InvalidRequest(
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens; the request asks for "
                f"{count} prompt tokens plus {self._max_tokens(body)} completion tokens.",
                param="messages",
            )
        return count

    async def _generate(
        self, kind: JobKind, body: dict[str, Any], resume: Resume | None = None
    ) -> AsyncIterator[tuple[int, int]]:
        """(choice index, token id) pairs, a step at a time."""
        self._prompt_tokens(kind, body)
        prompt = _prompt_text(kind, body)
        n = int(body.get("n") or 1)
        before = resume.token_ids if resume else ()
        for token in fake_token_ids(prompt, self._max_tokens(body, resume), before):
            for index in range(n):
                yield index, token
            await asyncio.sleep(self.token_delay)
            await self._step()

    def _usage(self, kind: JobKind, body: dict[str, Any], resume: Resume | None = None) -> dict[str, int]:
        """The whole request's usage: a continuation counts the tokens sent before it once."""
        prompt = self._prompt_tokens(kind, body)
        sent = len(resume.token_ids) if resume else 0
        completion = (self._max_tokens(body, resume) + sent) * int(body.get("n") or 1)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _base(self, kind: JobKind, body: dict[str, Any], request_id: str, *, chunk: bool) -> dict[str, Any]:
        if kind is JobKind.CHAT:
            obj, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl"
        else:
            obj, prefix = "text_completion", "cmpl"
        return {"id": f"{prefix}-{request_id}", "object": obj, "created": int(time.time()), "model": self.model}

    @staticmethod
    def _choice(kind: JobKind, index: int, text: str, finish: str | None, *, chunk: bool) -> dict[str, Any]:
        if kind is JobKind.COMPLETION:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        key, value = ("delta", {"content": text}) if chunk else ("message", {"role": "assistant", "content": text})
        return {"index": index, key: value, "logprobs": None, "finish_reason": finish}

    def _response(self, kind: JobKind, body: dict[str, Any], request_id: str, texts: list[str]) -> dict[str, Any]:
        finish = self._finish_reason(body)
        return self._base(kind, body, request_id, chunk=False) | {
            "choices": [self._choice(kind, i, text, finish, chunk=False) for i, text in enumerate(texts)],
            "usage": self._usage(kind, body),
        }

    # --- embeddings ---------------------------------------------------------------------------------------------

    async def embed_many(
        self, bodies: list[dict[str, Any]], request_ids: list[str]
    ) -> list[dict[str, Any] | bytes | Exception]:
        """One call for all the inputs, cut back per request by the fake's own usage rule (words per text)."""
        if len(bodies) == 1:
            return await super().embed_many(bodies, request_ids)
        inputs = [inputs_of(body["input"]) for body in bodies]
        merged_body = bodies[0] | {"input": [item for items in inputs for item in items]}
        try:
            merged = await self.run(JobKind.EMBEDDING, merged_body, request_ids[0])
        except ConveyorError:  # refused: each alone says which
            return await super().embed_many(bodies, request_ids)
        out: list[dict[str, Any] | bytes | Exception] = []
        at = 0
        for items in inputs:
            data = [item | {"index": i} for i, item in enumerate(merged["data"][at : at + len(items)])]
            at += len(items)
            tokens = sum(_item_tokens(item) for item in items)
            out.append(merged | {"data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return out

    def _embed(self, body: dict[str, Any]) -> dict[str, Any]:
        items: list[str | list[int]] = inputs_of(body["input"])
        dim = int(body.get("dimensions") or self.embedding_dim)
        if not 1 <= dim <= self.embedding_dim:  # as vLLM refuses it for a Matryoshka model of this size
            raise InvalidRequest(
                f"Model {self.model!r} only supports dimensions in range [1, {self.embedding_dim}], got {dim}.",
                param="dimensions",
            )
        longest = max((_item_tokens(item) for item in items), default=0)
        if longest > MAX_MODEL_LEN:  # as vLLM refuses it
            raise InvalidRequest(
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens; an input has {longest}.",
                param="input",
            )
        _burn(self.cpu_per_input * len(items))
        data = []
        for index, item in enumerate(items):
            vector = fake_vector(item, dim)
            embedding: list[float] | str = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_item_tokens(item) for item in items)
        return {
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # --- score and rerank ----------------------------------------------------------------------------------------

    def _score(self, kind: JobKind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """vLLM's bi-encoder answers: the cosine similarity of each pair's fake vectors, in vLLM's shapes
        (``worker.scoring.answer``: every text's words counted once as its usage)."""
        if "score" not in self.capabilities:  # as vLLM refuses it on a model without a scoring API
            raise InvalidRequest(f"model {self.model!r} does not support this endpoint")
        firsts, seconds = scoring.sides(kind, body)
        scores = scoring.pair_scores(firsts, seconds, lambda a, b: _cosine(a, b, self.embedding_dim))
        tokens = sum(_item_tokens(_text_of(item)) for item in (*firsts, *seconds))
        return scoring.answer(kind, body, request_id, self.model, scores, tokens)

    def scores_by_embedding(self) -> bool:
        return {"embed", "score"} <= self.capabilities


def _text_of(item: Any) -> str:
    """A text to score as the fake reads it: the text, or the text parts of multimodal content."""
    if isinstance(item, str):
        return item
    return " ".join(str(part.get("text", "")) for part in item.get("content", ()) if isinstance(part, dict))


def _cosine(first: Any, second: Any, dim: int) -> float:
    """The cosine similarity of two texts' fake vectors (as ``worker.scoring`` computes it from their embeddings)."""
    return scoring.cosine(fake_vector(_text_of(first), dim), fake_vector(_text_of(second), dim))
