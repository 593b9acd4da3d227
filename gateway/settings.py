"""Typed settings of the gateway process (env prefix ``CONVEYOR_GATEWAY_``), built once in the entry point."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from conveyor.batch_lines import MAX_EXPIRY_SECONDS, MIN_EXPIRY_SECONDS
from conveyor.redis_settings import RedisSettings

PLACEHOLDER_KEYS = {"changeme", "change-me", "secret", "sk-xxx", "your-api-key"}


class GatewaySettings(RedisSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_GATEWAY_", extra="forbid")

    # redis_url and queue_backend come from RedisSettings
    host: str = "0.0.0.0"
    port: int = 8000
    #: the address Prometheus scrapes this gateway at (advertised in the registry, with ``port``); default: the
    #: local IP this host reaches Redis from (the pod's or container's IP)
    advertise_host: str | None = None
    #: served model names this deployment expects (comma-separated); a request for one with no live worker is
    #: answered 503 at once, a name that is neither configured nor served by any worker is 404
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: models that may have no worker at all (comma-separated; e.g. KEDA with ``minReplicaCount: 0``): a request
    #: for one with no live worker waits in its queue, within its deadline, for a worker to start (``conveyor up``
    #: says this itself for its models with ``min_workers = 0``)
    scale_to_zero: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: static bearer keys clients may send (comma-separated), without limits or usage accounting. Managed keys
    #: (``conveyor keys``) work beside them; with neither, requests need no key
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: the bearer key of the admin API (``/admin/...``); unset, the admin routes do not exist
    admin_key: str | None = Field(default=None, validation_alias="CONVEYOR_ADMIN_KEY")
    #: how long a gateway trusts what it read of a managed key (a revoked key stops everywhere within this long;
    #: inference requests see a revocation at once, in the admission script)
    key_cache_seconds: float = Field(default=0.5, ge=0, le=1)
    #: output tokens reserved against a key's tokens per minute for a request that sets no ``max_tokens``
    default_output_tokens: int = Field(default=256, ge=1)
    #: share of a key's tokens per minute its batches may fill; the rest stays for its interactive requests
    batch_token_share: float = Field(default=0.8, gt=0, le=1)
    #: default and ceiling of a request's deadline in seconds; clients may ask for less with
    #: the ``X-Conveyor-Timeout`` header
    request_timeout: float = Field(default=600, gt=0)
    #: on SIGTERM: stop accepting and let open requests and streams finish for this long (set it to
    #: ``request_timeout`` where rollouts must cut no stream, with the orchestrator's grace period above it)
    shutdown_grace: float = Field(default=30, ge=0)
    #: jobs waiting or running per model before new ones are refused with 429
    max_queue_depth: int = Field(default=1024, ge=1)
    retry_after_seconds: int = Field(default=1, ge=1)
    #: largest request body accepted (413 beyond it, refused before it is read)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    #: largest batch input file upload (OpenAI's limit: 200 MB)
    max_upload_bytes: int = Field(default=200 * 1024 * 1024 + 64 * 1024, ge=1024)
    #: the file store of batch inputs and outputs, shared with the workers: a directory or ``file://`` URL;
    #: default ``<data dir>/files``
    files_url: str | None = Field(default=None, validation_alias="CONVEYOR_FILES_URL")
    #: lines of a batch run as one bulk job (one engine call for embeddings)
    batch_chunk_lines: int = Field(default=64, ge=1, le=10_000)
    #: how long a batch may run before it expires (OpenAI's window is 24h; shorten it for tests)
    batch_window_seconds: float = Field(default=86_400, gt=0)
    #: how long the record of a finished batch (completed, failed, expired, cancelled) is kept before the sweeper
    #: purges it; its files live on until they expire or are deleted
    batch_retention_seconds: float = Field(default=30 * 86_400, gt=0)
    #: the shortest ``expires_after`` / ``output_expires_after`` accepted. OpenAI's rule, and the default, is 3600
    #: (one hour); lower it only in tests, to see files expire without waiting an hour
    min_expiry_seconds: int = Field(default=MIN_EXPIRY_SECONDS, ge=1, le=MAX_EXPIRY_SECONDS)
    #: one log line per request (uvicorn's access log); off by default, it costs ~6% of the gateway's CPU
    access_log: bool = False
    #: browser origins allowed to call the API (comma-separated, e.g. ``https://app.example.com``; ``*`` for any);
    #: empty: no CORS headers at all, so browsers on other origins are refused by their own rules
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("models", "api_keys", "scale_to_zero", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_placeholder_keys(cls, keys: list[str]) -> list[str]:
        if any(_weak(k) for k in keys):
            raise ValueError("api_keys holds a placeholder or a key shorter than 8 characters; set real keys")
        return keys

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, key: str | None) -> str | None:
        if key and _weak(key):
            raise ValueError("CONVEYOR_ADMIN_KEY is a placeholder or shorter than 8 characters; set a real key")
        return key or None


def _weak(key: str) -> bool:
    return key.lower() in PLACEHOLDER_KEYS or len(key) < 8
