"""OpenAI request and response models the gateway validates against. Importable without FastAPI or vLLM.

Models allow extra fields: anything we do not know (``top_k``, ``guided_json``, ``chat_template_kwargs`` ...)
passes through to the worker's engine untouched.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _GenerationRequest(OpenAIBaseModel):
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


class EmbeddingRequest(OpenAIBaseModel):
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
