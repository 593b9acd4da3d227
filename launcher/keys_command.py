"""``conveyor keys``: managed API keys and their usage, straight on Redis (the admin API does the same over HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from conveyor import redis_client
from conveyor.errors import ConveyorError
from conveyor.key_renames import rename_old_keys
from conveyor.keys import LIMIT_FIELDS, USAGE_COUNTERS, ApiKey, KeyCreate, KeyStore, KeyUpdate
from conveyor.outage import REDIS_DOWN
from conveyor.status import table

UNLIMITED = ("none", "unlimited")
LIMIT_FLAGS = (("rpm", "requests per minute"), ("tpm", "tokens per minute"), ("max_queued", "requests queued at once"))


def _limit(value: str) -> int | None:
    """A limit on the command line: a positive number, or ``none`` (update: remove the limit)."""
    if value.lower() in UNLIMITED:
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number (or 'none')") from None
    if number < 1:
        raise argparse.ArgumentTypeError("a limit is at least 1; 'none' removes it")
    return number


def _weight(value: str) -> float | None:
    """A key's share of a busy model's queue: a number above 0 (1 by default), or ``none`` (update: back to 1)."""
    if value.lower() in UNLIMITED:
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number (or 'none')") from None
    if not 0 < number <= 1000:
        raise argparse.ArgumentTypeError("a weight is above 0 and at most 1000; 'none' sets it back to 1")
    return number


def _models(value: str) -> list[str] | None:
    """Allowed models, comma-separated; ``all`` allows every model."""
    if value.lower() == "all":
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def add_parser(commands: Any, redis_help: str) -> argparse.ArgumentParser:
    keys = commands.add_parser("keys", help="managed API keys: create, list, update, revoke, usage")
    keys.add_argument("--redis-url", help=redis_help)
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    def limits(parser: argparse.ArgumentParser, removable: bool) -> None:
        for name, what in LIMIT_FLAGS:
            extra = "; 'none' removes it" if removable else ""
            flag = "--" + name.replace("_", "-")
            parser.add_argument(flag, dest=name, type=_limit, default=argparse.SUPPRESS, help=f"{what}{extra}")
        help_models = "comma-separated models the key may use" + ("; 'all' for every model" if removable else "")
        parser.add_argument("--models", type=_models, default=argparse.SUPPRESS, help=help_models)
        help_weight = "its share of a busy model's queue against other keys (default 1; 2: twice as many jobs)"
        parser.add_argument("--weight", type=_weight, default=argparse.SUPPRESS, help=help_weight)
        parser.add_argument("--json", action="store_true", help="print JSON")

    create = sub.add_parser("create", help="a new key; its secret is printed once")
    create.add_argument("--name", required=True, help="unique among active keys; labels its usage and metrics")
    limits(create, removable=False)
    create.set_defaults(keys_handler=_create)

    listing = sub.add_parser("list", help="the active keys (with --all, revoked ones too)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(keys_handler=_list)

    update = sub.add_parser("update", help="change a key's name, limits or models")
    update.add_argument("key", help="the key's id or name")
    update.add_argument("--name", default=argparse.SUPPRESS, help="a new name")
    limits(update, removable=True)
    update.set_defaults(keys_handler=_update)

    revoke = sub.add_parser("revoke", help="stop a key on every gateway (within a second)")
    revoke.add_argument("key", help="the key's id or name")
    revoke.add_argument("--json", action="store_true", help="print JSON")
    revoke.set_defaults(keys_handler=_revoke)

    usage = sub.add_parser("usage", help="requests and tokens per key, model and UTC day")
    usage.add_argument("key", nargs="?", help="one key's id or name (default: every key)")
    usage.add_argument("--days", type=int, default=30, help="days back from today, today included (default: 30)")
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.set_defaults(keys_handler=_usage)
    parser: argparse.ArgumentParser = keys
    return parser


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


async def _create(store: KeyStore, args: argparse.Namespace) -> None:
    fields = _given(args, ("name", *LIMIT_FIELDS))
    key = await store.create(KeyCreate(**fields))
    if args.json:
        _print_json(key)
        return
    print(f"created {key.id} ({key.name}){_limits_text(key)}")
    print(f"secret (shown once, store it now): {key.value}")


async def _list(store: KeyStore, args: argparse.Namespace) -> None:
    keys = await store.list_keys(include_revoked=args.all)
    if args.json:
        print(json.dumps([k.model_dump() for k in keys], indent=2))
        return
    rows = [
        [k.id, k.name, k.redacted_value, _text(k.rpm), _text(k.tpm), _text(k.max_queued),
         ",".join(k.models) if k.models else "all", f"{k.weight or 1:g}", "revoked" if k.revoked_at else "active"]
        for k in keys
    ]  # fmt: skip
    print(table([["ID", "NAME", "KEY", "RPM", "TPM", "MAX QUEUED", "MODELS", "WEIGHT", "STATE"], *rows]))


async def _update(store: KeyStore, args: argparse.Namespace) -> None:
    changes = _given(args, ("name", *LIMIT_FIELDS))
    if not changes:
        raise SystemExit(
            "conveyor keys update: nothing to change (give --name, --rpm, --tpm, --max-queued, --models or --weight)"
        )
    key = await store.update(args.key, KeyUpdate(**changes))
    _print_json(key) if args.json else print(f"updated {key.id} ({key.name}){_limits_text(key)}")


async def _revoke(store: KeyStore, args: argparse.Namespace) -> None:
    key = await store.revoke(args.key)
    _print_json(key) if args.json else print(f"revoked {key.id} ({key.name})")


async def _usage(store: KeyStore, args: argparse.Namespace) -> None:
    if not 1 <= args.days <= 400:
        raise SystemExit("conveyor keys usage: --days is 1 to 400")
    rows = await store.usage(args.key, args.days)
    if args.json:
        print(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    if not rows:
        print(f"no usage in the last {args.days} days")
        return
    rows_out = [[r.date, r.key_name, r.model, *(str(getattr(r, c)) for c in USAGE_COUNTERS)] for r in rows]
    totals = [sum(getattr(r, c) for r in rows) for c in USAGE_COUNTERS]
    rows_out.append(["total", "", "", *(str(t) for t in totals)])
    print(table([["DAY", "KEY", "MODEL", *(c.upper().replace("_", " ") for c in USAGE_COUNTERS)], *rows_out]))


def _text(limit: int | None) -> str:
    return "-" if limit is None else str(limit)


def _limits_text(key: ApiKey) -> str:
    parts = [f"{name}={getattr(key, name)}" for name, _ in LIMIT_FLAGS if getattr(key, name) is not None]
    if key.models:
        parts.append(f"models={','.join(key.models)}")
    if key.weight is not None:
        parts.append(f"weight={key.weight:g}")
    return f": {', '.join(parts)}" if parts else ": no limits"


def _print_json(item: BaseModel) -> None:
    print(item.model_dump_json(indent=2))


def run(redis_url: str, args: argparse.Namespace) -> int:
    handler: Callable[[KeyStore, argparse.Namespace], Awaitable[None]] = args.keys_handler

    async def main() -> None:
        redis = redis_client.connect(redis_url)
        try:
            await rename_old_keys(redis)
            await handler(KeyStore(redis), args)
        finally:
            await redis_client.close(redis)

    try:
        asyncio.run(main())
    except ConveyorError as exc:
        print(f"conveyor keys: {exc.message}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"conveyor keys: {where}: {str(first['msg']).removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    except REDIS_DOWN as exc:
        print(f"conveyor keys: Redis at {redis_url} is not reachable ({exc})", file=sys.stderr)
        return 1
    return 0
