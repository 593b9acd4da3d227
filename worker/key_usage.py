"""What a finished job used, for the managed API key it was admitted under (``JobEnvelope.tenant``).

The worker counts it from the engine's own usage, and ``JobSource.finish`` applies it in the same fenced step that
removes the job, so a job run twice (its first worker lost) counts once: the key's unfinished-job entry goes, the
tokens admission charged are reconciled with the real ones (if that second of the window is still counted), and the
day's usage per model grows. Then this worker's Prometheus counters, labelled with the key's name, follow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter

from conveyor import key_layout
from conveyor.contract import JobEnvelope, JobKind, TenantRef
from conveyor.keys import usage_day

KEY_REQUESTS = Counter(
    "conveyor_key_requests", "Requests (and batch lines) answered, by managed API key and model.", ["key", "model"]
)
KEY_TOKENS = Counter(
    "conveyor_key_tokens",
    "Tokens the engine reported, by managed API key, model and type (prompt, completion, embedding).",
    ["key", "model", "type"],
)


@dataclass(frozen=True, slots=True)
class KeyUsage:
    tenant: TenantRef
    model: str
    kind: JobKind
    #: requests answered (batch lines, for a chunk); 0 for a job that failed
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: unix time the job finished (the usage's day)
    at: float = 0.0

    @classmethod
    def of(cls, envelope: JobEnvelope, requests: int, prompt: int = 0, completion: int = 0) -> KeyUsage | None:
        """What a job (or a batch chunk: ``requests`` is its lines answered) used, for its API key; None without one."""
        if envelope.tenant is None:
            return None
        return cls(envelope.tenant, envelope.model, envelope.kind, requests, prompt, completion, at=time.time())

    @property
    def token_delta(self) -> int:
        """The correction to what admission charged: the real tokens minus the reservation."""
        return self.prompt_tokens + self.completion_tokens - self.tenant.reserved

    def counters(self) -> dict[str, int]:
        """The day's usage counters of the key, per model, this job adds to."""
        if self.kind is JobKind.EMBEDDING:
            tokens = {"embedding_tokens": self.prompt_tokens}
        else:
            tokens = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        counts = {"requests": self.requests} | tokens
        return {f"{self.model}|{name}": n for name, n in counts.items() if n}

    @property
    def day_key(self) -> str:
        return key_layout.usage_key(self.tenant.key_id, usage_day(self.at))

    def record_metrics(self) -> None:
        name = self.tenant.name
        if self.requests:
            KEY_REQUESTS.labels(name, self.model).inc(self.requests)
        for field, n in self.counters().items():
            kind = field.rpartition("|")[2]
            if kind != "requests":
                KEY_TOKENS.labels(name, self.model, kind.removesuffix("_tokens")).inc(n)


def tokens_of(usage: Any) -> tuple[int, int]:
    """Prompt and completion tokens of an OpenAI ``usage`` object (zeros when there is none)."""
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def tokens_in_body(raw: bytes) -> tuple[int, int]:
    """Prompt and completion tokens of an engine's JSON response."""
    return tokens_of(orjson.loads(raw).get("usage"))


def usage_chunk(chunk: dict[str, Any] | str) -> tuple[dict[str, Any], bool] | None:
    """The ``usage`` a stream chunk carries and whether the chunk carries nothing else (the last chunk, sent when
    ``include_usage`` is on, has no choices), else None."""
    if isinstance(chunk, str) and '"usage"' not in chunk:
        return None
    parsed = orjson.loads(chunk) if isinstance(chunk, str) else chunk
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return (usage, not parsed.get("choices")) if isinstance(usage, dict) else None
