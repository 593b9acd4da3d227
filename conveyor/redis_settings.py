"""The settings every process of a deployment shares: where Redis is and which queue backend its jobs wait in."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings

from conveyor.contract import QueueBackend
from conveyor.redis_client import DEFAULT_REDIS_URL, RedisUrl, check_queue_backend


class RedisSettings(BaseSettings):
    """The base of each process's settings class (gateway, worker, ``conveyor up``): one place refuses a queue
    backend its Redis cannot run (arq on a Redis Cluster)."""

    redis_url: RedisUrl = Field(default=DEFAULT_REDIS_URL, validation_alias="CONVEYOR_REDIS_URL")
    #: where jobs wait: ``arq`` (arq's layout) or ``streams`` (Redis Streams: one delivery per job, Redis Cluster);
    #: every gateway and worker of a deployment must use the same one
    queue_backend: QueueBackend = Field(
        default=QueueBackend.ARQ, validation_alias="CONVEYOR_QUEUE_BACKEND", validate_default=True
    )

    @field_validator("queue_backend")
    @classmethod
    def _runs_on_redis(cls, backend: QueueBackend, info: ValidationInfo) -> QueueBackend:
        url = info.data.get("redis_url")  # absent when the URL itself was refused
        if isinstance(url, str):
            check_queue_backend(url, backend)
        return backend
