"""Managed API keys: create, list, update, revoke, and read their usage. Shared by ``conveyor keys`` (the CLI), the
gateway's admin API and its key check.

Everything lives in Redis, so every gateway replica sees a change at once. A key's secret is shown once, when it is
created; Redis keeps only its SHA-256 (the secret is 32 random bytes, so a plain hash cannot be reversed), a redacted
form for lists, its limits and allowed models. A revoked key keeps its record (its usage still names it) but leaves the
index of hashes, so it no longer authenticates. Names are unique among active keys: they label metrics and usage.

Limits are enforced by the gateway's reservation script (``gateway/key_admission.py``), which reads the record's fields
``revoked_at``, ``rpm``, ``tpm``, ``max_queued`` and ``models`` directly. A key's ``weight`` is its share of a busy
model's queue (``conveyor.fair_share``), carried on its jobs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import time
import uuid
from typing import Any, cast

from pydantic import BaseModel, Field, field_validator
from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.errors import Conflict, InvalidRequest, NotFound

SECRET_PREFIX = "sk-cv-"
ID_PREFIX = "key_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: a key's usage per model and UTC day: requests answered, and the engine's token counts
USAGE_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "embedding_tokens")
#: how long a day's usage stays in Redis
USAGE_RETENTION_SECONDS = 400 * 86_400
LIMIT_FIELDS = ("rpm", "tpm", "max_queued", "models", "weight")

#: Create a key unless an active key has its name. KEYS: record, hashes, names, index. ARGV: id, hash, name,
#: created_at, then field/value pairs of the record. Returns 1, or 0 when the name is taken.
CREATE_SCRIPT = """
if redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
#: Rename an active key. KEYS: record, names. ARGV: id, old name, new name. Returns 1, or 0 when the name is taken.
RENAME_SCRIPT = """
if ARGV[2] == ARGV[3] then return 1 end
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
redis.call('HSET', KEYS[1], 'name', ARGV[3])
return 1
"""
#: Revoke: the hash leaves the index (no gateway resolves it any more), the name is freed, the record stays.
#: KEYS: record, hashes, names. ARGV: id, revoked_at.
REVOKE_SCRIPT = """
local record = redis.call('HMGET', KEYS[1], 'hash', 'name', 'revoked_at')
if not record[1] then return 0 end
if record[3] then return 1 end
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[2])
redis.call('HDEL', KEYS[2], record[1])
if redis.call('HGET', KEYS[3], record[2]) == ARGV[1] then redis.call('HDEL', KEYS[3], record[2]) end
return 1
"""

#: Change a key's limits in one step, so admission sees the old ones or the new ones, never half of each (a script,
#: not MULTI/EXEC, which a Redis Cluster client refuses). KEYS: record. ARGV: how many field/value pairs follow, the
#: pairs to set, then the fields to delete.
UPDATE_SCRIPT = """
local count = tonumber(ARGV[1])
for i = 2, 2 * count, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 2 * count + 2, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
return 1
"""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError("a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if value.startswith(ID_PREFIX):
        raise ValueError(f"a key name may not start with {ID_PREFIX!r} (key ids do)")
    return value


class KeyLimits(BaseModel):
    """A key's limits; ``None`` is no limit (every model, for ``models``)."""

    rpm: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, description="tokens per minute (prompt + completion)")
    max_queued: int | None = Field(default=None, ge=1, description="interactive jobs waiting or running at once")
    models: list[str] | None = Field(default=None, description="models the key may use; null: every model")
    weight: float | None = Field(
        default=None, gt=0, le=1000, description="its share of a busy model's queue against other keys; null: 1"
    )

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[str] | None) -> list[str] | None:
        if models is not None and (not models or any(not m.strip() for m in models)):
            raise ValueError("list at least one model name, or leave it out to allow every model")
        return models


class KeyCreate(KeyLimits):
    name: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _name(value)


class KeyUpdate(KeyLimits):
    """The fields given are changed (``null`` removes a limit); the others are kept."""

    name: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return None if value is None else _name(value)


class ApiKey(KeyLimits):
    object: str = "api_key"
    id: str
    name: str
    redacted_value: str
    created_at: int
    revoked_at: int | None = None


class CreatedKey(ApiKey):
    """Returned once, by ``create``: the only time the secret is shown."""

    value: str


class UsageRow(BaseModel):
    date: str
    key_id: str
    key_name: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_tokens: int = 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record_fields(limits: KeyLimits, fields: set[str]) -> tuple[dict[str, str], list[str]]:
    """The record's fields to set and to delete for the limits named in ``fields``."""
    values = {name: getattr(limits, name) for name in LIMIT_FIELDS if name in fields}
    to_set = {k: json.dumps(v) if k == "models" else str(v) for k, v in values.items() if v is not None}
    return to_set, [k for k, v in values.items() if v is None]


def _key_from(key_id: str, raw: dict[bytes, bytes]) -> ApiKey:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    limits = {k: int(fields[k]) for k in ("rpm", "tpm", "max_queued") if fields.get(k)}
    return ApiKey(
        id=key_id,
        name=fields["name"],
        redacted_value=fields["redacted_value"],
        created_at=int(fields["created_at"]),
        revoked_at=int(fields["revoked_at"]) if fields.get("revoked_at") else None,
        models=json.loads(fields["models"]) if fields.get("models") else None,
        weight=float(fields["weight"]) if fields.get("weight") else None,
        **limits,
    )


class KeyStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._create = redis.register_script(CREATE_SCRIPT)
        self._rename = redis.register_script(RENAME_SCRIPT)
        self._revoke = redis.register_script(REVOKE_SCRIPT)
        self._update = redis.register_script(UPDATE_SCRIPT)

    async def create(self, request: KeyCreate) -> CreatedKey:
        key_id = f"{ID_PREFIX}{uuid.uuid4().hex[:16]}"
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        digest = secret_hash(secret)
        now = int(time.time())
        record = {
            "name": request.name,
            "hash": digest,
            "redacted_value": f"{secret[:10]}...{secret[-4:]}",
            "created_at": str(now),
            **_record_fields(request, set(LIMIT_FIELDS))[0],
        }
        keys = [
            key_layout.api_key_key(key_id),
            key_layout.API_KEY_HASHES,
            key_layout.API_KEY_NAMES,
            key_layout.API_KEYS_INDEX,
        ]
        pairs = [item for pair in record.items() for item in pair]
        if not await self._create(keys=keys, args=[key_id, digest, request.name, now, *pairs]):
            raise _name_taken(request.name)
        return CreatedKey(**(await self.get(key_id)).model_dump(), value=secret)

    async def get(self, ref: str) -> ApiKey:
        """A key by id, or an active key by name."""
        key_id = ref
        if not ref.startswith(ID_PREFIX):
            found = await cast(Any, self.redis.hget(key_layout.API_KEY_NAMES, ref))
            key_id = _text(found) if found else ref
        raw = await cast(Any, self.redis.hgetall(key_layout.api_key_key(key_id)))
        if not raw:
            raise NotFound(f"No API key {ref!r}.", param="key", code="key_not_found")
        return _key_from(key_id, raw)

    async def resolve(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None."""
        key_id = await cast(Any, self.redis.hget(key_layout.API_KEY_HASHES, secret_hash(secret)))
        if key_id is None:
            return None
        with_record = await cast(Any, self.redis.hgetall(key_layout.api_key_key(_text(key_id))))
        key = _key_from(_text(key_id), with_record) if with_record else None
        return key if key is not None and key.revoked_at is None else None

    async def ever_created(self) -> bool:
        """Whether a managed key was ever created here (revoked ones keep their record): then every request needs a
        key, also once the last one is revoked."""
        return bool(await self.redis.exists(key_layout.API_KEYS_INDEX))

    async def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        ids = [_text(i) for i in await self.redis.zrange(key_layout.API_KEYS_INDEX, 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(key_layout.api_key_key(key_id))
            records = await pipe.execute()
        keys = [_key_from(key_id, raw) for key_id, raw in zip(ids, records, strict=True) if raw]
        return [k for k in keys if include_revoked or k.revoked_at is None]

    async def update(self, ref: str, changes: KeyUpdate) -> ApiKey:
        key = await self.get(ref)
        if key.revoked_at is not None:
            raise InvalidRequest(f"API key {key.id} is revoked; create a new one.", param="key", code="key_revoked")
        given = changes.model_fields_set
        if changes.name is not None and "name" in given:
            names = [key_layout.api_key_key(key.id), key_layout.API_KEY_NAMES]
            if not await self._rename(keys=names, args=[key.id, key.name, changes.name]):
                raise _name_taken(changes.name)
        to_set, to_delete = _record_fields(changes, given)
        if to_set or to_delete:
            pairs = [item for pair in to_set.items() for item in pair]
            await self._update(keys=[key_layout.api_key_key(key.id)], args=[len(to_set), *pairs, *to_delete])
        return await self.get(key.id)

    async def revoke(self, ref: str) -> ApiKey:
        key = await self.get(ref)
        keys = [key_layout.api_key_key(key.id), key_layout.API_KEY_HASHES, key_layout.API_KEY_NAMES]
        await self._revoke(keys=keys, args=[key.id, int(time.time())])
        return await self.get(key.id)

    async def usage(self, ref: str | None = None, days: int = 30, today: dt.date | None = None) -> list[UsageRow]:
        """Usage per key, model and UTC day over the last ``days`` days (today included), oldest first."""
        keys = [await self.get(ref)] if ref else await self.list_keys(include_revoked=True)
        last = today or dt.datetime.now(dt.UTC).date()
        dates = [(last - dt.timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                for date in dates:
                    pipe.hgetall(key_layout.usage_key(key.id, date))
            days_raw = iter(await pipe.execute())
        rows: list[UsageRow] = []
        for key in keys:
            for date in dates:
                per_model: dict[str, dict[str, int]] = {}
                for field, value in next(days_raw).items():
                    model, _, counter = _text(field).rpartition("|")
                    per_model.setdefault(model, {})[counter] = int(value)
                for model, counters in sorted(per_model.items()):
                    rows.append(UsageRow(date=date, key_id=key.id, key_name=key.name, model=model, **counters))
        return rows


def _name_taken(name: str) -> Conflict:
    return Conflict(f"An active API key is already named {name!r}.", param="name", code="key_name_taken")


def usage_day(at: float) -> str:
    """The UTC day usage at unix time ``at`` is counted on."""
    return dt.datetime.fromtimestamp(at, dt.UTC).date().isoformat()
