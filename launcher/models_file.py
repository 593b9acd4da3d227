"""The models file ``conveyor up`` reads, and writes back when the fleet changes through the admin API.

[[models]]
name = "smollm2-135m-instruct"      # the served model name clients ask for
path = "HuggingFaceTB/SmolLM2-135M-Instruct"   # weights: local folder, Hugging Face id or packaged name
task = "generate"                   # auto | generate | embed
gpus = ["0", "1"]                   # one worker per GPU (CUDA_VISIBLE_DEVICES); or replicas = N on CPU
engine_args = { max_model_len = 4096 }

The fields are ``conveyor.fleet.ModelSpec``'s. Writing back keeps the file's comments and the tables of the models
that did not change (tomlkit edits the document in place).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tomlkit.items import AoT, Table

from conveyor.errors import InvalidRequest
from conveyor.fleet import ModelSpec, check_fleet


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: empty is allowed: ``conveyor up`` then runs the gateway alone, and models are added through the admin API
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _valid_fleet(self) -> ModelsFile:
        try:
            check_fleet(self.models)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return self


def load(path: Path) -> ModelsFile:
    with path.open("rb") as handle:
        return ModelsFile.model_validate(tomllib.load(handle))


def _fields(spec: ModelSpec) -> dict[str, Any]:
    """What the file says of a model: the fields that differ from the defaults (replicas follow from gpus)."""
    fields = spec.model_dump(exclude_defaults=True, exclude={"replicas"} if spec.gpus else set())
    return {"name": spec.name} | fields


def save(path: Path, specs: list[ModelSpec]) -> None:
    """Write the fleet to the models file: a changed model's table is updated in place, a removed one dropped, a new
    one appended; the rest of the file (comments, unchanged tables) stays as it was. Written atomically."""
    document = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    tables = document.get("models")
    if not isinstance(tables, AoT):
        tables = tomlkit.aot()
        document["models"] = tables
    wanted = {spec.name: _fields(spec) for spec in specs}
    for index in reversed(range(len(tables))):
        table: Table = tables[index]
        fields = wanted.pop(str(table.get("name")), None)
        if fields is None:
            del tables[index]
            continue
        for key in [k for k in table if k not in fields]:
            del table[key]
        for key, value in fields.items():
            if table.get(key) != value:
                table[key] = _inline(value)
    for fields in wanted.values():
        table = tomlkit.table()
        for key, value in fields.items():
            table[key] = _inline(value)
        tables.append(table)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(tomlkit.dumps(document))
    temporary.replace(path)


def _inline(value: Any) -> Any:
    """Tables inside a model (engine_args, env) as inline tables, as the file writes them."""
    if isinstance(value, dict):
        inline = tomlkit.inline_table()
        inline.update({k: _inline(v) for k, v in value.items()})
        return inline
    return value
