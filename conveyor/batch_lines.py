"""The lines of a batch input file (OpenAI's batch JSONL), checked one at a time, and OpenAI's file and batch objects.

Used by the gateway (checking uploads and batches) and by workers (reading the lines of the chunks they run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from conveyor.contract import JobKind
from conveyor.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
)

#: a batch's ``endpoint`` and its lines' ``url``: the gateway's paths of each kind (rerank and score as vLLM serves
#: them, with and without ``/v1``)
KIND_FOR_URL: dict[str, JobKind] = {
    "/v1/chat/completions": JobKind.CHAT,
    "/v1/completions": JobKind.COMPLETION,
    "/v1/embeddings": JobKind.EMBEDDING,
    "/v1/rerank": JobKind.RERANK,
    "/v2/rerank": JobKind.RERANK,
    "/rerank": JobKind.RERANK,
    "/v1/score": JobKind.SCORE,
    "/score": JobKind.SCORE,
}
REQUEST_MODEL: dict[JobKind, type[BaseModel]] = {
    JobKind.CHAT: ChatCompletionRequest,
    JobKind.COMPLETION: CompletionRequest,
    JobKind.EMBEDDING: EmbeddingRequest,
    JobKind.RERANK: RerankRequest,
    JobKind.SCORE: ScoreRequest,
}
#: OpenAI's limits on a batch input file
MAX_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024


class LineError(Exception):
    """Line ``line`` (1-based) of an input file is not a request this batch can run."""

    def __init__(self, line: int, message: str, code: str = "invalid_batch_line", param: str | None = None) -> None:
        super().__init__(f"Line {line}: {message}")
        self.line = line
        self.message = f"Line {line}: {message}"
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class BatchLine:
    custom_id: str
    url: str
    model: str


def parse_line(raw: bytes, number: int) -> BatchLine:
    """Check one line: a JSON object with ``custom_id``, ``method`` POST, a supported ``url`` and a ``body`` that is
    a valid request for it (not streamed)."""
    try:
        item = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise LineError(number, "not valid JSON: each line must be one JSON object.", "invalid_json_line") from None
    if not isinstance(item, dict):
        raise LineError(number, "each line must be a JSON object.", "invalid_json_line")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(number, "`custom_id` must be a non-empty string.", param="custom_id")
    if item.get("method") != "POST":
        raise LineError(number, "`method` must be POST.", param="method")
    url = item.get("url")
    if url not in KIND_FOR_URL:
        supported = ", ".join(KIND_FOR_URL)
        raise LineError(number, f"`url` {url!r} is not supported; use one of {supported}.", "invalid_url", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise LineError(number, "`body` must be a JSON object.", param="body")
    try:
        request = REQUEST_MODEL[KIND_FOR_URL[url]].model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise LineError(number, f"invalid body: {where}: {first.get('msg')}", param=f"body.{where}") from None
    if body.get("stream"):
        raise LineError(number, "batch requests cannot be streamed.", param="body.stream")
    return BatchLine(custom_id, url, str(getattr(request, "model")))  # noqa: B009 - every request model has one


@dataclass
class FileCheck:
    """Everything learnt while checking a whole input file, line by line, a block at a time."""

    lines: int = 0
    urls: set[str] = field(default_factory=set)
    #: each model asked for, and the first line that asked for it
    models: dict[str, int] = field(default_factory=dict)
    custom_ids: set[str] = field(default_factory=set)
    _rest: bytes = b""

    def feed(self, block: bytes) -> None:
        parts = (self._rest + block).split(b"\n")
        self._rest = parts.pop()
        for part in parts:
            self._line(part)

    def finish(self) -> None:
        if self._rest.strip():
            self._line(self._rest)
        self._rest = b""
        if self.lines == 0:
            raise LineError(1, "the file holds no requests.", "empty_file")

    def _line(self, raw: bytes) -> None:
        number = self.lines + 1
        if not raw.strip():
            raise LineError(number, "empty line: each line must be one JSON object.", "invalid_json_line")
        if number > MAX_LINES:
            raise LineError(number, f"a batch file holds at most {MAX_LINES} requests.", "too_many_lines")
        line = parse_line(raw, number)
        if line.custom_id in self.custom_ids:
            raise LineError(number, f"`custom_id` {line.custom_id!r} is used twice.", "duplicate_custom_id")
        self.custom_ids.add(line.custom_id)
        self.urls.add(line.url)
        self.models.setdefault(line.model, number)
        self.lines = number


# ---- OpenAI's objects --------------------------------------------------------------------------------------------

#: OpenAI's bounds of a file's ``expires_after`` and a batch's ``output_expires_after``: 1 hour to 30 days
MIN_EXPIRY_SECONDS = 3600
MAX_EXPIRY_SECONDS = 30 * 86_400
#: how long a batch input file lives when its upload asks nothing (OpenAI's default for purpose ``batch``; files of
#: other purposes live until they are deleted)
BATCH_INPUT_EXPIRY_SECONDS = 30 * 86_400


class ExpiresAfter(BaseModel):
    """OpenAI's expiration policy of a file: it expires ``seconds`` after its ``anchor`` (only ``created_at``)."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class StoredFile(BaseModel):
    """A file's record: OpenAI's object plus what only Conveyor needs (where it is, what its lines ask for)."""

    file: FileObject
    store_name: str
    lines: int = 0
    urls: list[str] = []
    models: dict[str, int] = {}
    #: the id of the managed API key that uploaded it (or whose batch wrote it): only that key sees it
    owner: str | None = None

    def expired(self, now: float) -> bool:
        return self.file.expires_at is not None and now >= self.file.expires_at

    def visible_to(self, key_id: str | None) -> bool:
        """Requests with a managed key see their own files; a static key (or none) sees every file."""
        return key_id is None or self.owner == key_id


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})


class BatchUsage(BaseModel):
    """Tokens of the lines that succeeded, as each line's own usage counted them (OpenAI's batch ``usage``)."""

    input_tokens: int = 0
    input_tokens_details: dict[str, int] = {"cached_tokens": 0}
    output_tokens: int = 0
    output_tokens_details: dict[str, int] = {"reasoning_tokens": 0}
    total_tokens: int = 0


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = BatchRequestCounts()
    usage: BatchUsage = BatchUsage()
    metadata: dict[str, str] | None = None
    model: str | None = None


def list_page(data: list[Any], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page."""
    ids = [getattr(item, "id", None) for item in data]
    return {
        "object": "list",
        "data": data,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
        "has_more": has_more,
    }
