"""What a request is charged against its key's tokens per minute when it is admitted, before any engine saw it.

Nothing before the engine has the model's tokenizer, so the prompt is estimated as OpenAI's own rate limiter does: a
token per 4 characters of text (token-id inputs count exactly), plus a few tokens per chat message. Output is reserved
at ``max_completion_tokens`` / ``max_tokens`` (times ``n``), or ``default_output`` when the request sets neither.
The worker reconciles the charge with the engine's real usage when the job finishes (``worker.key_usage``).
Score and rerank requests are charged every text once and no output: what a bi-encoder (an embedding model) reads;
a cross-encoder reads the query again with each document, and that difference is reconciled at the end too.
"""

from __future__ import annotations

import math
from typing import Any

from conveyor.contract import JobKind
from conveyor.protocol import SCORED_FIELDS

CHARS_PER_TOKEN = 4
#: the role and separators a chat template adds around each message
TOKENS_PER_MESSAGE = 4


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _input_tokens(value: Any) -> int:
    """A prompt or embedding input: text, a list of texts, token ids, or lists of token ids; a text to score may also
    be multimodal content (``{"content": [parts]}``), of which only text parts are counted."""
    if isinstance(value, str):
        return _text_tokens(value)
    if isinstance(value, dict):
        return _parts_tokens(value.get("content"))
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return len(value)
        return sum(_input_tokens(item) for item in value)
    return 0


def _parts_tokens(content: Any) -> int:
    """Content as text or as parts, of which only text parts are counted."""
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return _text_tokens(content) if isinstance(content, str) else 0


def _message_tokens(message: Any) -> int:
    return TOKENS_PER_MESSAGE + _parts_tokens(message.get("content") if isinstance(message, dict) else None)


def prompt_tokens(kind: JobKind, body: dict[str, Any]) -> int:
    if kind is JobKind.CHAT:
        return sum(_message_tokens(m) for m in body.get("messages") or [])
    if kind.scores:
        return sum(_input_tokens(body.get(name)) for name in SCORED_FIELDS)
    return _input_tokens(body.get("input") if kind is JobKind.EMBEDDING else body.get("prompt"))


def output_tokens(kind: JobKind, body: dict[str, Any], default_output: int) -> int:
    if not kind.generates:
        return 0
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    per_choice = asked if isinstance(asked, int) and asked > 0 else default_output
    choices = body.get("n")
    return per_choice * (choices if isinstance(choices, int) and choices > 0 else 1)


def charge(kind: JobKind, body: dict[str, Any], default_output: int) -> int:
    """Tokens reserved for a request at admission."""
    return prompt_tokens(kind, body) + output_tokens(kind, body, default_output)
