"""OpenAI request and response models the gateway validates against. Importable without FastAPI or vLLM.

Models allow extra fields: anything we do not know (``top_k``, ``guided_json``, ``chat_template_kwargs`` ...)
passes through to the worker's engine untouched.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator
from pydantic_core import PydanticCustomError


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class QueuedRequest(OpenAIBaseModel):
    """What every request that goes on a queue may carry."""

    #: vLLM's: lower runs earlier. Orders a key's jobs in its queue (``conveyor.fair_share``); passed on to an engine
    #: that schedules by priority, dropped for one that does not
    priority: int = Field(default=0, ge=-(2**63), le=2**63 - 1, strict=True)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _GenerationRequest(QueuedRequest):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(QueuedRequest):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @model_validator(mode="after")
    def _input_not_empty(self) -> EmbeddingRequest:
        if isinstance(self.input, list) and (
            not self.input or any(isinstance(item, (str, list)) and len(item) == 0 for item in self.input)
        ):
            raise ValueError("input must not be empty")
        if self.input == "":
            raise ValueError("input must not be empty")
        return self


def _score_input(value: Any, where: str = "") -> None:
    """One text to score: a non-empty string, or vLLM's multimodal ``{"content": [parts]}``."""
    if isinstance(value, str) and value:
        return
    if isinstance(value, dict) and isinstance(value.get("content"), list) and value["content"]:
        return
    raise PydanticCustomError(
        "score_input", f"{where} must be a non-empty string (or an object with a non-empty `content` list)".lstrip()
    )


def _score_inputs(value: Any) -> Any:
    """One text or a non-empty list of them (vLLM's ``ScoreInput | list[ScoreInput]``), passed on as it came."""
    if isinstance(value, list):
        if not value:
            raise PydanticCustomError("score_inputs", "must hold at least one text")
        for i, item in enumerate(value):
            _score_input(item, f"item {i}")
    else:
        _score_input(value)
    return value


def _one_score_input(value: Any) -> Any:
    _score_input(value)
    return value


#: a text (or multimodal content) to score, and one or many of them
ScoreInput = Annotated[
    str | dict[str, Any], PlainValidator(_one_score_input, json_schema_input_type=str | dict[str, Any])
]
ScoreInputs = Annotated[
    str | dict[str, Any] | list[str | dict[str, Any]],
    PlainValidator(_score_inputs, json_schema_input_type=str | dict[str, Any] | list[str | dict[str, Any]]),
]


class _ScoringRequest(QueuedRequest):
    """What score and rerank requests share. vLLM's own extras (``truncate_prompt_tokens``, ``use_activation``,
    ``instruction`` ...) pass through."""

    model: str = Field(min_length=1)

    @model_validator(mode="after")
    def _not_streamed(self) -> _ScoringRequest:
        if (self.model_extra or {}).get("stream"):
            raise PydanticCustomError("not_streamed", "score and rerank requests cannot be streamed (stream)")
        return self


class RerankRequest(_ScoringRequest):
    """``/v1/rerank``, ``/v2/rerank``, ``/rerank`` (vLLM's ``RerankRequest``: Jina's and Cohere's shape)."""

    query: ScoreInput
    documents: ScoreInputs
    #: the best ``top_n`` documents (0: all of them)
    top_n: int = Field(default=0, ge=0, strict=True)


#: the pairs of fields a score request may give its two sides in (vLLM's four ``ScoreRequest`` shapes)
SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


#: the fields of a score or rerank request that hold its texts
SCORED_FIELDS = ("query", *dict.fromkeys(name for pair in SCORE_PAIRS for name in pair))


class ScoreRequest(_ScoringRequest):
    """``/v1/score``, ``/score``: a score per pair, the first side 1:1, 1:N or N:N with the second."""

    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None

    @model_validator(mode="after")
    def _one_pair(self) -> ScoreRequest:
        sides = self.model_fields_set & {name for pair in SCORE_PAIRS for name in pair}  # not vLLM's extras
        given = {name for name in sides if getattr(self, name, None) is not None}
        pairs = [pair for pair in SCORE_PAIRS if set(pair) <= given]
        names = " or ".join(f"`{a}` with `{b}`" for a, b in SCORE_PAIRS)
        if len(pairs) != 1 or given - set(pairs[0]):
            raise PydanticCustomError("score_pair", f"give exactly one pair of sides to score: {names}")
        first, second = (getattr(self, name) for name in pairs[0])
        n_first = len(first) if isinstance(first, list) else 1
        n_second = len(second) if isinstance(second, list) else 1
        if n_first > 1 and n_first != n_second:
            raise PydanticCustomError(
                "score_pair_lengths",
                f"`{pairs[0][0]}` and `{pairs[0][1]}` must pair 1:1, 1:N or N:N; they hold {n_first} and {n_second}",
            )
        return self


class FleetState(BaseModel):
    """How ``conveyor up`` runs a model of its fleet: loading, serving, restarting, draining or failed, the workers
    it should have and those serving, its restarts, and what is going on."""

    state: str
    replicas: int
    serving: int
    restarts: int
    message: str = ""


class ModelCard(BaseModel):
    """OpenAI's model object, plus what Conveyor knows of the model's workers."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "conveyor"
    #: serving (a live worker), loading (workers starting), scaled_to_zero (no worker: a request waits for one to
    #: start), failed (the last worker's engine failed), unavailable
    status: Literal["serving", "loading", "scaled_to_zero", "failed", "unavailable"] = "serving"
    max_model_len: int | None = None
    capabilities: list[str] = Field(default_factory=list)
    live_workers: int = 0
    loading_workers: int = 0
    #: why the last worker stopped, while none serves (engine_dead, engine_stalled, engine_start_failed)
    failure: str | None = None
    #: for a model ``conveyor up`` runs: its supervisor's view of it
    fleet: FleetState | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
