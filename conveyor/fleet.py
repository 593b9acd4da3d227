"""The fleet of one host: which models ``conveyor up`` should run (the desired state) and how each is doing.

The desired state lives in Redis so the gateway's admin API can change it while ``conveyor up`` runs; ``conveyor up``
(``launcher.supervisor``) reconciles its processes with it and writes each model's run state back, which
``/admin/models``, ``/v1/models`` and ``conveyor status`` show. The models file is where the desired state starts and
where every change is written back (``launcher.models_file``), so a restart comes back with the same fleet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.errors import InvalidRequest

RunState = Literal["loading", "serving", "restarting", "draining", "scaled_to_zero", "failed"]

# Scripts, not MULTI/EXEC or WATCH: a Redis Cluster client refuses transactions. Their keys are the control plane's
# (one slot), so each runs whole on one node.

#: The whole desired state at once. KEYS: fleet hash, saved marker. ARGV: name/spec pairs.
REPLACE_SCRIPT = """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[2], 1)
return 1
"""
#: Set (or remove) one model's spec if the fleet is still as it was read (compare-and-set on the whole hash, which
#: is small). KEYS: fleet hash. ARGV: name, new spec ('' removes it), then the name/spec pairs read.
#: Returns 1, or 0 when the fleet changed meanwhile.
CHANGE_SCRIPT = """
if redis.call('HLEN', KEYS[1]) ~= (#ARGV - 2) / 2 then return 0 end
for i = 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then return 0 end
end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


class ModelSpec(BaseModel):
    """One model of the fleet: the fields of a ``[[models]]`` table of the models file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    path: str | None = None
    engine: Literal["vllm", "fake"] = "vllm"
    task: Literal["auto", "generate", "embed"] = "auto"
    replicas: int = Field(default=1, ge=1, le=64)
    #: workers kept while the model is idle: 0 lets it scale to zero (its workers stop after ``idle_seconds``
    #: without work, and start again when a request arrives, which waits in the queue meanwhile); default: replicas
    min_workers: int | None = Field(default=None, ge=0, le=64)
    #: seconds without queued or running work before a model with ``min_workers`` below its replicas scales down
    idle_seconds: float = Field(default=300.0, gt=0)
    gpus: list[str] = Field(default_factory=list)
    #: GPUs this model may share with other models that say so too (else an overlap is refused)
    share_gpus: bool = False
    #: cores this model's engines bind to on CPU, e.g. "0" or "0-1" (VLLM_CPU_OMP_THREADS_BIND)
    cpu_threads_bind: str | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("gpus")
    @classmethod
    def _distinct_gpus(cls, gpus: list[str]) -> list[str]:
        devices = [gpu_set(g) for g in gpus]
        if any(not d or "" in d for d in devices) or sum(map(len, devices)) != len(set().union(*devices)):
            raise ValueError('list each GPU once, by its index or UUID (one worker\'s GPUs comma-separated: "0,1")')
        return [",".join(part.strip() for part in g.split(",")) for g in gpus]

    @model_validator(mode="after")
    def _gpus_or_replicas(self) -> ModelSpec:
        if self.gpus and self.replicas not in (1, len(self.gpus)):
            raise ValueError(f"model {self.name}: give either gpus (one worker each) or replicas, not both")
        if self.gpus:
            self.replicas = len(self.gpus)
        if self.min_workers is not None and self.min_workers > self.replicas:
            raise ValueError(f"model {self.name}: min_workers ({self.min_workers}) is more than its replicas")
        return self

    @property
    def idle_workers(self) -> int:
        """How many workers it keeps while idle (0: it scales to zero)."""
        return self.replicas if self.min_workers is None else self.min_workers

    def capabilities(self) -> list[str]:
        """What its workers will be able to do, as far as the spec says (``auto``: not known before they start); vLLM
        scores and reranks with every embedding model (cosine similarity of the embeddings)."""
        return {"embed": ["embed", "score"], "generate": ["generate"]}.get(self.task, [])

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

    def same_workers(self, other: ModelSpec) -> bool:
        """Whether ``other`` runs workers like these (only the number of replicas may differ)."""
        scaling = {"replicas", "min_workers", "idle_seconds"}
        return self.model_dump(exclude=scaling) == other.model_dump(exclude=scaling)


def gpu_set(entry: str) -> set[str]:
    """The devices of one ``gpus`` entry: one worker's GPUs, comma-separated as ``CUDA_VISIBLE_DEVICES`` takes them
    (``"0,1"`` for a worker with two)."""
    return {part.strip() for part in entry.split(",")}


def check_fleet(specs: Iterable[ModelSpec]) -> None:
    """Names unique, and no GPU given to two models unless both share it (entries compared as sets of devices: "0,1"
    overlaps "1"). Raises ``InvalidRequest`` saying which."""
    seen: dict[str, ModelSpec] = {}
    owners: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise InvalidRequest(f"Model {spec.name!r} is listed twice; names must be unique.", param="name")
        seen[spec.name] = spec
        for gpu in sorted(set().union(*map(gpu_set, spec.gpus))):
            other = owners.get(gpu)
            if other is not None and not (other.share_gpus and spec.share_gpus):
                raise InvalidRequest(
                    f"GPU {gpu} is already assigned to model {other.name!r}; give {spec.name!r} other GPUs, or set "
                    "share_gpus = true on both models to share it (their engines then split its memory: lower "
                    "gpu_memory_utilization in engine_args).",
                    param="gpus",
                    code="gpu_conflict",
                )
            owners[gpu] = spec


class ModelRun(BaseModel):
    """How a model of the fleet is doing, as ``conveyor up`` last saw it."""

    state: RunState
    #: workers the model should have, and how many are serving
    replicas: int
    serving: int = 0
    restarts: int = 0
    #: what is going on, in a sentence (why it is restarting or failed, how long it has been loading)
    message: str = ""
    #: the last lines of the log of the worker that failed last
    last_log: list[str] = Field(default_factory=list)
    updated_at: float = Field(default_factory=time.time)


class FleetStore:
    """The desired state (``key_layout.FLEET_MODELS``) and the run states (``key_layout.FLEET_STATUS``) in Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._replace = redis.register_script(REPLACE_SCRIPT)
        self._change = redis.register_script(CHANGE_SCRIPT)

    async def specs(self) -> dict[str, ModelSpec]:
        raw = await cast(Any, self.redis.hgetall(key_layout.FLEET_MODELS))
        return {_text(k): ModelSpec.model_validate_json(v) for k, v in raw.items()}

    async def managed(self) -> bool:
        """Whether a ``conveyor up`` manages this Redis's fleet (then the admin API may change it)."""
        return bool(await self.redis.exists(key_layout.FLEET_SUPERVISOR))

    async def replace(self, specs: list[ModelSpec]) -> None:
        """The whole desired state at once (``conveyor up`` starting from its models file)."""
        check_fleet(specs)
        pairs = [item for s in specs for item in (s.name, s.model_dump_json())]
        await self._replace(keys=[key_layout.FLEET_MODELS, key_layout.FLEET_SAVED], args=pairs)

    async def saved(self) -> bool:
        """Whether Redis holds a desired state (an empty fleet included): False after it restarted empty."""
        return bool(await self.redis.exists(key_layout.FLEET_SAVED))

    async def change(self, name: str, build: Callable[[ModelSpec | None], ModelSpec | None]) -> ModelSpec | None:
        """Change one model atomically: ``build`` gets its spec now (None: not in the fleet) and returns the new one
        (None: remove it) or raises; the result is checked against the rest of the fleet. A change that another one
        overtook is tried again on the fresh state (optimistic: a compare-and-set script, ``CHANGE_SCRIPT``)."""
        while True:
            raw = await cast(Any, self.redis.hgetall(key_layout.FLEET_MODELS))
            specs = {_text(k): ModelSpec.model_validate_json(v) for k, v in raw.items()}
            new = build(specs.get(name))
            if new is not None:
                check_fleet([*(s for n, s in specs.items() if n != name), new])
            read = [item for pair in raw.items() for item in pair]
            args = [name, "" if new is None else new.model_dump_json(), *read]
            if await self._change(keys=[key_layout.FLEET_MODELS], args=args):
                return new

    async def runs(self) -> dict[str, ModelRun]:
        raw = await cast(Any, self.redis.hgetall(key_layout.FLEET_STATUS))
        return {_text(k): ModelRun.model_validate_json(v) for k, v in raw.items()}

    async def allow_zero(self, specs: Iterable[ModelSpec]) -> None:
        """Mark these models as ones whose requests wait for a worker to start (``key_layout.scale_to_zero_key``),
        for the next ``SCALE_TO_ZERO_TTL_SECONDS`` (refreshed by each round of ``conveyor up``)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for spec in specs:
                key = key_layout.scale_to_zero_key(spec.name)
                pipe.set(key, json.dumps(spec.capabilities()), ex=key_layout.SCALE_TO_ZERO_TTL_SECONDS)
            await pipe.execute()

    async def set_runs(self, runs: dict[str, ModelRun], gone: Iterable[str] = ()) -> None:
        """Write these run states and drop those of ``gone``: at most two commands on one hash, each atomic, in one
        round trip, not one transaction (a Redis Cluster client refuses those). Nothing needs both at once: callers
        write runs or drop gone ones, and a reader between the two would only see a removed model's last state."""
        names = list(gone)
        async with self.redis.pipeline(transaction=False) as pipe:
            if runs:
                pipe.hset(key_layout.FLEET_STATUS, mapping={n: r.model_dump_json() for n, r in runs.items()})
            if names:
                pipe.hdel(key_layout.FLEET_STATUS, *names)
            await pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
