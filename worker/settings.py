"""Typed settings of a worker process (env prefix ``CONVEYOR_WORKER_``), built once in the entry point."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from conveyor.redis_settings import RedisSettings
from worker.embed_batcher import MAX_INPUTS
from worker.engine_share import BUSY_INPUTS


class WorkerSettings(RedisSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_WORKER_", extra="forbid")

    # redis_url and queue_backend come from RedisSettings
    #: the served model name clients ask for (and the name of the queue this worker drains)
    model: str
    #: where the weights are: a local folder or a Hugging Face id; defaults to ``model``
    model_path: str | None = None
    #: ``vllm`` (the real engine) or ``fake`` (a deterministic test and benchmark tool, never a default)
    engine: Literal["vllm", "fake"] = "vllm"
    #: what the model does; ``auto`` asks the engine (vLLM reads the model's config)
    task: Literal["auto", "generate", "embed"] = "auto"
    #: extra keyword arguments for vLLM's ``AsyncEngineArgs`` (JSON object in the environment)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    #: concurrent jobs; 0 = the engine's own concurrency (vLLM: ``max_num_seqs``)
    max_jobs: int = Field(default=0, ge=0)
    #: batch chunks run at once (within ``max_jobs``), taken only when no interactive job waits; 0 takes none
    bulk_jobs: int = Field(default=2, ge=0)
    #: while interactive requests run (and for 2 s after), batch lines hold at most this many inputs of the engine,
    #: so an interactive request waits behind a short engine step of batch work, not a full one
    bulk_busy_inputs: int = Field(default=BUSY_INPUTS, ge=1)
    #: concurrent embedding requests with the same parameters run as one engine call: a group takes the requests that
    #: arrive in the same turn of the event loop (0, the default: nobody waits), or for this many seconds
    embed_batch_wait: float = Field(default=0.0, ge=0)
    #: a group of embedding requests runs at once when it holds this many inputs
    embed_batch_max_inputs: int = Field(default=MAX_INPUTS, ge=1)
    #: the file store holding batch inputs and outputs (shared with the gateway): a directory or ``file://`` URL;
    #: default ``<data dir>/files``
    files_url: str | None = Field(default=None, validation_alias="CONVEYOR_FILES_URL")
    #: seconds between queue polls when no wake-up arrives (jobs normally start on the gateway's wake-up at once;
    #: this timer only covers lost wake-ups and jobs handed back by a dead worker)
    poll_delay: float = Field(default=0.5, gt=0)
    #: on SIGTERM: stop taking jobs and let running ones finish for this long, then hand them back
    grace_period: int = Field(default=25, ge=0)
    heartbeat_interval: float = Field(default=2.0, gt=0)
    #: a claimed job's lease: renewed every third of it while the job runs; a job whose worker died is run again by
    #: another worker once this has passed
    lease_seconds: float = Field(default=6.0, gt=0)
    #: runs of one job before it is answered ``worker_lost`` (a job that kills every worker that runs it stops here)
    max_tries: int = Field(default=3, ge=1)
    #: a stream cut mid-way (its worker killed, drained or its engine dead) goes on where it was on the next worker
    #: (request migration, ``worker.migration``); off, it ends with a ``worker_lost`` error event where it was cut
    migrate: bool = True
    #: times one request may be continued on another worker; one cut more ends it with a ``worker_lost`` event
    max_migrations: int = Field(default=3, ge=0)
    #: how often the engine is checked (alive, and making progress while it has work)
    engine_check_interval: float = Field(default=5.0, gt=0)
    #: an engine with running requests and no progress for this long counts as hung: the worker exits
    engine_stall_timeout: float = Field(default=120.0, gt=0)
    #: port of the worker's own /metrics (0 picks a free one; it is advertised in the worker registry)
    metrics_port: int = Field(default=0, ge=0)
    metrics_host: str = "0.0.0.0"
    #: the address Prometheus scrapes this worker at (advertised in the registry); default: the local IP this
    #: host reaches Redis from (the pod's or container's IP)
    advertise_host: str | None = None
    worker_id: str | None = None
    # --- CPU engine knobs (ignored on GPUs) ---
    #: KV-cache size in GiB for vLLM's CPU backend (``VLLM_CPU_KVCACHE_SPACE``)
    cpu_kvcache_space: int = Field(default=2, ge=1)
    #: cores the engine's OpenMP threads bind to (``VLLM_CPU_OMP_THREADS_BIND``), e.g. ``0`` or ``0-1``; ``auto``
    cpu_threads_bind: str = "auto"
    # --- fake engine knobs (tests and benchmarks) ---
    fake_token_delay: float = Field(default=0.0, ge=0)
    fake_embedding_dim: int = Field(default=32, ge=1)
    #: CPU seconds the fake engine burns per embedding input (a compute-bound engine, for the scale-out benchmark)
    fake_cpu_per_input: float = Field(default=0.0, ge=0)

    @property
    def weights(self) -> str:
        return self.model_path or self.model
