"""A non-streamed chat or completion answer built from its stream's chunks (OpenAI's documented equivalence: the
deltas joined, the last finish reason, the usage chunk), for generations run as streams so that they can be
continued on another worker (``worker.migration``)."""

from __future__ import annotations

from typing import Any

from conveyor.contract import JobKind


def from_chunks(kind: JobKind, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``chat.completion`` or ``text_completion`` object of one choice that these chunks stream."""
    first = next((c for c in chunks if c.get("choices")), chunks[0] if chunks else {})
    texts: list[str] = []
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
    usage = fingerprint = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        fingerprint = chunk.get("system_fingerprint") or fingerprint
        for part in chunk.get("choices") or ():
            texts.append((part.get("delta") or {}).get("content") or part.get("text") or "")
            for field in ("finish_reason", "stop_reason"):
                if part.get(field) is not None:
                    choice[field] = part[field]
    text = "".join(texts)
    if kind is JobKind.CHAT:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    built = {
        "id": first.get("id"),
        "object": "chat.completion" if kind is JobKind.CHAT else "text_completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [choice],
        "usage": usage,
    }
    return built | ({"system_fingerprint": fingerprint} if fingerprint else {})
