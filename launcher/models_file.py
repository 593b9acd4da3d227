"""The models file ``conveyor up`` reads: which models to serve, how, and how many workers of each.

[[models]]
name = "smollm2-135m-instruct"      # the served model name clients ask for
path = "HuggingFaceTB/SmolLM2-135M-Instruct"   # weights: local folder, Hugging Face id or packaged name
task = "generate"                   # auto | generate | embed
gpus = ["0", "1"]                   # one worker per GPU (CUDA_VISIBLE_DEVICES); or replicas = N on CPU
engine_args = { max_model_len = 4096 }
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str | None = None
    engine: Literal["vllm", "fake"] = "vllm"
    task: Literal["auto", "generate", "embed"] = "auto"
    replicas: int = Field(default=1, ge=1)
    gpus: list[str] = Field(default_factory=list)
    #: cores this model's engines bind to on CPU, e.g. "0" or "0-1" (VLLM_CPU_OMP_THREADS_BIND)
    cpu_threads_bind: str | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gpus_or_replicas(self) -> ModelSpec:
        if self.gpus and self.replicas not in (1, len(self.gpus)):
            raise ValueError(f"model {self.name}: give either gpus (one worker each) or replicas, not both")
        return self

    def workers(self) -> list[tuple[list[str], dict[str, str]]]:
        """The command-line arguments and environment of each of this model's workers."""
        args = ["--engine", self.engine, "--task", self.task]
        if self.path:
            args += ["--model-path", self.path]
        if self.engine_args:
            args += ["--engine-args", json.dumps(self.engine_args)]
        env = dict(self.env)
        if self.cpu_threads_bind:
            env["CONVEYOR_WORKER_CPU_THREADS_BIND"] = self.cpu_threads_bind
        if self.gpus:
            return [(args, env | {"CUDA_VISIBLE_DEVICES": gpu}) for gpu in self.gpus]
        return [(args, env) for _ in range(self.replicas)]


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsFile:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique: {names}")
        return self


def load(path: Path) -> ModelsFile:
    with path.open("rb") as handle:
        return ModelsFile.model_validate(tomllib.load(handle))
