"""The job contract between gateway and worker: envelope, reply and stream messages, Redis key names.

Both sides import this module; it imports neither FastAPI nor vLLM. Bump ``ENVELOPE_VERSION`` whenever a field
changes meaning, so a worker can refuse what it does not understand instead of guessing.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

ENVELOPE_VERSION = 1
JOB_FUNCTION = "conveyor_run"
KEY_PREFIX = "conveyor"


class JobKind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


# Capability a worker must advertise for a kind of job.
CAPABILITY_FOR_KIND: dict[JobKind, str] = {
    JobKind.CHAT: "generate",
    JobKind.COMPLETION: "generate",
    JobKind.EMBEDDING: "embed",
}


class JobEnvelope(BaseModel):
    """What the gateway puts on a model's queue. ``request_id`` is also the arq job id."""

    v: int = ENVELOPE_VERSION
    request_id: str
    model: str
    kind: JobKind
    body: dict[str, Any]
    stream: bool = False
    created: float = Field(default_factory=time.time)
    deadline: float

    def seconds_left(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)


class ErrorInfo(BaseModel):
    """An OpenAI-shaped error plus the HTTP status it maps to."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class Reply(BaseModel):
    """The answer to a non-streamed job, pushed to the request's reply list."""

    body: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class StreamMessage(BaseModel):
    """One message on a request's stream channel. ``seq`` counts from 0 without gaps."""

    seq: int
    type: Literal["chunk", "error", "end"]
    data: dict[str, Any] | None = None
    error: ErrorInfo | None = None


# ---- Redis key names: the only place they are spelled --------------------------------------------------------


def queue_name(model: str) -> str:
    """The arq queue (a sorted set of job ids) of one model."""
    return f"{KEY_PREFIX}:queue:{model}"


def reply_key(request_id: str) -> str:
    return f"{KEY_PREFIX}:reply:{request_id}"


def stream_channel(request_id: str) -> str:
    return f"{KEY_PREFIX}:stream:{request_id}"


def model_workers_key(model: str) -> str:
    """Sorted set: worker id -> unix time until which its last heartbeat keeps it alive."""
    return f"{KEY_PREFIX}:workers:{model}"


def worker_info_key(worker_id: str) -> str:
    return f"{KEY_PREFIX}:worker:{worker_id}"


def model_card_key(model: str) -> str:
    """What the workers of a model advertise (capabilities, context length); refreshed with every heartbeat."""
    return f"{KEY_PREFIX}:model:{model}"


MODELS_KEY = f"{KEY_PREFIX}:models"  # set of every model name a worker has ever served


# ---- arq serialisation: JSON, never pickle --------------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    return json.loads(data)
