"""The job contract between gateway and worker: envelope, reply and stream messages (the Redis key names they meet
at are ``conveyor.key_layout``'s).

Both sides import this module; it imports neither FastAPI nor vLLM. Bump ``ENVELOPE_VERSION`` whenever a field
changes meaning, so a worker can refuse what it does not understand instead of guessing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field

ENVELOPE_VERSION = 3
JOB_FUNCTION = "conveyor_run"


class JobKind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    #: ``/v1/score``: a score per pair of texts (vLLM's ScoreRequest)
    SCORE = "score"
    #: ``/v1/rerank``, ``/v2/rerank``: a query's documents ranked (vLLM's RerankRequest, Jina's and Cohere's shape)
    RERANK = "rerank"

    @property
    def generates(self) -> bool:
        """Chat and completions: streamed (or run as a stream), token by token; the other kinds answer in one piece."""
        return self in (JobKind.CHAT, JobKind.COMPLETION)

    @property
    def scores(self) -> bool:
        """Score and rerank: texts compared (``conveyor.protocol.SCORED_FIELDS``), one score each."""
        return self in (JobKind.SCORE, JobKind.RERANK)


# Capability a worker must advertise for a kind of job.
CAPABILITY_FOR_KIND: dict[JobKind, str] = {
    JobKind.CHAT: "generate",
    JobKind.COMPLETION: "generate",
    JobKind.EMBEDDING: "embed",
    JobKind.SCORE: "score",
    JobKind.RERANK: "score",
}


class ChunkRef(BaseModel):
    """A bulk job: lines ``[first_line, first_line + lines)`` of a batch's input file, at bytes ``[start, end)``."""

    batch_id: str
    index: int
    input_file: str  # the file store's name of the input file
    start: int
    end: int
    first_line: int
    lines: int
    expires_at: float  # the batch's completion window ends here
    #: the tokens its lines are estimated to use (``conveyor.token_estimate``), charged to the batch's API key
    tokens: int = 0


class TenantRef(BaseModel):
    """The managed API key a job is accounted to (``conveyor.keys``), and what admission reserved for it: ``reserved``
    tokens in the tokens window's bucket of second ``second``, reconciled with the engine's usage when it finishes."""

    key_id: str
    name: str
    second: int
    reserved: int = 0
    #: the key's share of a lane against other keys' (``conveyor.fair_share``)
    weight: float = 1.0


class JobEnvelope(BaseModel):
    """What the gateway puts on a model's queue. ``request_id`` is also the queue's job id; ``reply_to`` names the
    gateway whose inbox takes the answer of a non-streamed job (``inbox_key``). A bulk job (on the bulk lane) carries
    ``chunk`` instead of a request body: the worker reads its lines from the file store."""

    v: int = ENVELOPE_VERSION
    request_id: str
    reply_to: str = ""
    model: str
    kind: JobKind
    body: dict[str, Any]
    stream: bool = False
    created: float = Field(default_factory=time.time)
    deadline: float
    chunk: ChunkRef | None = None
    tenant: TenantRef | None = None

    def seconds_left(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)


class ErrorInfo(BaseModel):
    """An OpenAI-shaped error plus the HTTP status it maps to."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None


def json_bytes(body: dict[str, Any] | bytes | str) -> bytes:
    """An engine's answer as JSON text: JSON text passes through untouched; a dict is written by orjson, as the vLLM
    adapter's generation answers are already written (pydantic's ``model_dump_json``: compact UTF-8, NaN and
    infinities as ``null``). What orjson refuses (an integer past 64 bits, a lone surrogate, a key that is not a
    string) is written by the standard library, with non-ASCII escaped."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a non-streamed job, pushed to its gateway's inbox as ``<request id>|ok|<body>`` or
    ``<request id>|error|<ErrorInfo>``.

    The body is the engine's response JSON, sent on to the client as it is (a 64-text embedding answer is ~200 KB:
    nobody parses it on the way).
    """

    request_id: str
    body: bytes | None = None
    error: ErrorInfo | None = None

    def encode(self) -> bytes:
        head = self.request_id.encode()
        if self.error is not None:
            return head + b"|error|" + self.error.model_dump_json().encode()
        return head + b"|ok|" + (self.body or b"{}")

    @classmethod
    def decode(cls, raw: bytes) -> Reply:
        request_id, kind, payload = raw.split(b"|", 2)
        if kind == b"ok":
            return cls(request_id.decode(), body=payload)
        if kind == b"error":
            return cls(request_id.decode(), error=ErrorInfo.model_validate_json(payload))
        raise ValueError(f"unknown reply kind {kind[:16]!r}")


@dataclass(frozen=True, slots=True)
class StreamFrame:
    """One message on a request's stream channel, on the wire as ``<seq>|<type>|<payload>``.

    ``seq`` counts from 0 without gaps. A chunk's payload is the OpenAI chunk's JSON text, relayed untouched (no
    side re-serialises tokens); an error's payload is an ``ErrorInfo`` as JSON; ``end`` has none.
    """

    seq: int
    type: Literal["chunk", "error", "end"]
    payload: bytes = b""

    def encode(self) -> bytes:
        return b"%d|%s|%s" % (self.seq, self.type.encode(), self.payload)

    @classmethod
    def decode(cls, raw: bytes) -> StreamFrame:
        seq, kind, payload = raw.split(b"|", 2)
        name = kind.decode()
        if name not in ("chunk", "error", "end"):
            raise ValueError(f"unknown stream frame type {name!r}")
        return cls(int(seq), name, payload)  # type: ignore[arg-type]

    @classmethod
    def chunk(cls, seq: int, chunk: dict[str, Any] | str) -> StreamFrame:
        return cls(seq, "chunk", json_bytes(chunk))

    @classmethod
    def failure(cls, seq: int, info: ErrorInfo) -> StreamFrame:
        return cls(seq, "error", info.model_dump_json().encode())

    def error_info(self) -> ErrorInfo:
        return ErrorInfo.model_validate_json(self.payload)


@dataclass(frozen=True, slots=True)
class StreamProgress:
    """What a generation has sent so far, kept while it runs so that another worker can go on where it was cut
    (request migration: ``worker.migration``). Stored as a list with one entry per frame sent (``progress_key``),
    written in the same script that publishes the frame, so it never says more or less than the client was sent.

    An entry is the token ids the frame added to the completion (``12,34``; empty for a frame without tokens),
    optionally followed by ``/`` and the prompt's token ids once the engine reported them; ``!<reason>`` marks a
    stream that cannot be continued exactly (``n > 1``, logprobs, guided decoding, ...). A leading ``=`` marks the
    frame that carried the finish reason, ``$`` the one that carried the usage: a continuation sends only what is
    left after them. A non-streamed generation records its chunks too (after a newline): its answer is built from all
    of them at the end.
    """

    #: frames sent: the next frame's sequence number
    seq: int = 0
    token_ids: tuple[int, ...] = ()
    prompt_token_ids: tuple[int, ...] | None = None
    #: why the stream cannot be continued, or None
    unresumable: str | None = None
    #: the chunks recorded with the entries (a non-streamed generation's)
    chunks: tuple[bytes, ...] = ()
    #: the finish reason was sent; the usage was sent
    finished: bool = False
    usage_sent: bool = False

    @staticmethod
    def entry(
        token_ids: Sequence[int] | None,
        prompt_token_ids: Sequence[int] | None = None,
        why: str = "",
        chunk: bytes | None = None,
        finished: bool = False,
        usage: bool = False,
    ) -> bytes:
        if token_ids is None:
            return b"!" + (why or "the engine did not report the tokens it generated").encode()
        text = ("=" if finished else "") + ("$" if usage else "") + ",".join(map(str, token_ids))
        if prompt_token_ids is not None:
            text += "/" + ",".join(map(str, prompt_token_ids))
        return text.encode() + (b"\n" + chunk if chunk is not None else b"")

    @classmethod
    def decode(cls, entries: Sequence[bytes]) -> StreamProgress:
        tokens: list[int] = []
        prompt: tuple[int, ...] | None = None
        why: str | None = None
        chunks: list[bytes] = []
        finished = usage_sent = False
        for raw in entries:
            if raw.startswith(b"!"):
                why = why or raw[1:].decode(errors="replace")
                continue
            raw, newline, chunk = raw.partition(b"\n")
            finished = finished or raw.startswith(b"=")
            raw = raw.removeprefix(b"=")
            usage_sent = usage_sent or raw.startswith(b"$")
            raw = raw.removeprefix(b"$")
            if newline:
                chunks.append(chunk)
            ids, _, prompt_ids = raw.partition(b"/")
            if ids:
                tokens.extend(int(i) for i in ids.split(b","))
            if prompt_ids and prompt is None:
                prompt = tuple(int(i) for i in prompt_ids.split(b","))
        return cls(len(entries), tuple(tokens), prompt, why, tuple(chunks), finished, usage_sent)


class QueueBackend(StrEnum):
    """Which layout jobs wait in: arq's (a sorted set per lane) or Redis Streams (a stream per lane, one consumer
    group of the model's workers)."""

    ARQ = "arq"
    STREAMS = "streams"


# ---- job serialisation: JSON, never pickle --------------------------------------------------------------------


#: twenty digits in a row: maybe an integer past 64 bits, which orjson would read as a float
_LONG_INTEGER = re.compile(rb"\d{20}")
_LONG_INTEGER_TEXT = re.compile(r"\d{20}")


def dumps(obj: Any) -> bytes:
    """UTF-8 JSON. Text is not escaped to ASCII, so a string that is not valid Unicode (a lone surrogate) fails here,
    at the gateway, with ``UnicodeEncodeError`` instead of inside an engine."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def dumps_finite(obj: Any) -> bytes:
    """``dumps`` by orjson (7 us less for an embedding job's envelope), for data without NaN or infinities (orjson
    writes them as ``null``, ``dumps`` as ``NaN``): a job's envelope, dumped in pydantic's JSON mode, which made them
    ``null`` already. What orjson refuses (a lone surrogate, an integer past 64 bits) goes to ``dumps``, which writes it
    or raises ``UnicodeEncodeError`` as before."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return dumps(obj)


def loads(data: bytes | str) -> Any:
    """``json.loads``, by orjson (5 us less for an embedding job's envelope) where it reads the same: not where an
    integer may pass 64 bits (orjson would make it a float), nor what orjson refuses (``NaN``, a lone surrogate's
    escape, text that is not UTF-8), which the standard library reads or refuses as before."""
    long = _LONG_INTEGER_TEXT.search(data) if isinstance(data, str) else _LONG_INTEGER.search(data)
    if long is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
