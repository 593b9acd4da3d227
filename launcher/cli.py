"""The ``conveyor`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conveyor import logs, redis_client
from conveyor.redis_client import DEFAULT_REDIS_URL
from launcher import keys_command


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """Flags given on the command line override the environment; absent ones leave it alone."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _refuse_unsupported_redis(command: str, url: str) -> None:
    """One line and exit 1 when the Redis at ``url`` answers but cannot serve Conveyor (``check_server``)."""
    try:
        asyncio.run(redis_client.check_server(url))
    except redis_client.UnsupportedRedis as exc:
        raise SystemExit(f"conveyor {command}: {exc}") from None


def _gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(**_overrides(args, ["host", "port", "models"]))
    _refuse_unsupported_redis("gateway", settings.redis_url)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level.lower(),
        access_log=settings.access_log,
        log_config=None,  # uvicorn's loggers go through ours (conveyor.logs)
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run
    from worker.settings import WorkerSettings

    overrides = _overrides(
        args, ["model", "model_path", "engine", "task", "max_jobs", "poll_delay", "metrics_port", "fake_token_delay"]
    )
    if args.engine_args is not None:
        overrides["engine_args"] = json.loads(args.engine_args)
    settings = WorkerSettings(**overrides)
    _refuse_unsupported_redis("worker", settings.redis_url)
    raise SystemExit(run(settings))


def _up(args: argparse.Namespace) -> None:
    from launcher.up import serve

    models = Path(args.models_file)
    if not models.is_file():
        raise SystemExit(f"conveyor up: no models file at {models} (see models.toml in the repository)")
    raise SystemExit(serve(models, args.host, args.port))


def _batch_embed(args: argparse.Namespace) -> None:
    from conveyor import batch_command

    source = Path(args.input)
    if not source.is_file():
        raise SystemExit(f"conveyor batch embed: no input file at {source}")
    raise SystemExit(
        batch_command.embed(
            source,
            args.model,
            Path(args.output),
            args.base_url or batch_command.default_base_url(),
            args.api_key or batch_command.default_api_key(),
            args.poll,
        )
    )


DESCRIPTION = """Conveyor: queue-backed, OpenAI-compatible LLM serving.

  conveyor up                 Redis, a worker per model in models.toml, and the gateway on :8000
  conveyor status             models, workers, queue depths and running batches, from Redis
  conveyor gateway            the HTTP API alone
  conveyor worker --model M   one engine serving model M's queue
  conveyor batch embed FILE   embed a file of texts through the Batches API
  conveyor keys create|list|update|revoke|usage
                              managed API keys: limits per key, usage per key

Every setting can also come from the environment (CONVEYOR_GATEWAY_*, CONVEYOR_WORKER_*, CONVEYOR_REDIS_URL);
a flag wins over the environment. See README.md for all of them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: %(default)s"
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], help=f"a line of text or of JSON per record (${logs.FORMAT_VARIABLE})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    redis_help = f"Redis to use (default: $CONVEYOR_REDIS_URL, else {DEFAULT_REDIS_URL})"

    gateway = commands.add_parser("gateway", help="serve the OpenAI-compatible HTTP API")
    gateway.add_argument("--host", help="address to listen on (default: 0.0.0.0)")
    gateway.add_argument("--port", type=int, help="port to listen on (default: 8000)")
    gateway.add_argument("--models", help="comma-separated model names this deployment serves (for /ready)")
    gateway.add_argument("--redis-url", help=redis_help)
    gateway.set_defaults(handler=_gateway)

    worker = commands.add_parser("worker", help="serve one model's queue with one engine")
    worker.add_argument("--model", help="the model name clients ask for (and the queue to drain); required")
    worker.add_argument("--model-path", dest="model_path", help="local folder or Hugging Face id of the weights")
    worker.add_argument("--engine", choices=["vllm", "fake"], help="vllm (default); fake is a test/benchmark tool")
    worker.add_argument("--task", choices=["auto", "generate", "embed"], help="what the model does (default: auto)")
    worker.add_argument("--engine-args", dest="engine_args", help="JSON object of vLLM engine arguments")
    worker.add_argument("--max-jobs", dest="max_jobs", type=int, help="concurrent jobs (default: the engine's)")
    worker.add_argument("--poll-delay", dest="poll_delay", type=float, help="seconds between idle queue polls")
    worker.add_argument("--metrics-port", dest="metrics_port", type=int, help="port of /metrics (0: any free)")
    worker.add_argument("--fake-token-delay", dest="fake_token_delay", type=float, help="fake engine: s/token")
    worker.add_argument("--redis-url", help=redis_help)
    worker.set_defaults(handler=_worker)

    up = commands.add_parser("up", help="run Redis, a worker per model in the models file, and the gateway")
    up.add_argument("--models-file", default="models.toml", help="TOML file of models to serve (default: %(default)s)")
    up.add_argument("--host", default="0.0.0.0", help="gateway address (default: %(default)s)")
    up.add_argument("--port", type=int, default=8000, help="gateway port (default: %(default)s)")
    up.add_argument("--redis-url", help="use this Redis instead of starting one (default: $CONVEYOR_REDIS_URL)")
    up.set_defaults(handler=_up)

    keys_command.add_parser(commands, redis_help).set_defaults(handler=_keys)

    status = commands.add_parser("status", help="models, workers, queue depths and running batches, from Redis")
    status.add_argument("--redis-url", help=redis_help)
    status.set_defaults(handler=_status)

    batch = commands.add_parser("batch", help="bulk work through the Batches API").add_subparsers(
        dest="batch_command", required=True, metavar="COMMAND"
    )
    embed = batch.add_parser(
        "embed",
        help="embed a file of texts (one per line) or an OpenAI batch JSONL; re-run after Ctrl-C to re-attach",
    )
    embed.add_argument("input", help="a text file, one text per line, or an OpenAI batch JSONL file")
    embed.add_argument("--model", required=True, help="served embedding model name")
    embed.add_argument("-o", "--output", required=True, help="where the output JSONL goes")
    embed.add_argument("--base-url", help="the API (default: $OPENAI_BASE_URL or http://localhost:8000/v1)")
    embed.add_argument("--api-key", help="bearer key (default: $CONVEYOR_API_KEY or $OPENAI_API_KEY)")
    embed.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks")
    embed.set_defaults(handler=_batch_embed)
    return parser


def _keys(args: argparse.Namespace) -> None:
    raise SystemExit(keys_command.run(os.environ.get("CONVEYOR_REDIS_URL", DEFAULT_REDIS_URL), args))


def _status(args: argparse.Namespace) -> None:
    from conveyor import status

    raise SystemExit(status.show(os.environ.get("CONVEYOR_REDIS_URL", DEFAULT_REDIS_URL)))


#: settings read from a variable without the command's prefix
UNPREFIXED = {
    "redis_url": "CONVEYOR_REDIS_URL",
    "queue_backend": "CONVEYOR_QUEUE_BACKEND",
    "admin_key": "CONVEYOR_ADMIN_KEY",
    "files_url": "CONVEYOR_FILES_URL",
}


def settings_error(command: str, exc: ValidationError) -> str:
    """One line per bad setting, naming the flag or variable to fix (instead of pydantic's traceback)."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        # a field read through its variable's full name (``validation_alias``) is reported by that name
        variable = (
            field
            if field.startswith("CONVEYOR_")
            else UNPREFIXED.get(field, f"CONVEYOR_{command.upper()}_{field.upper()}")
        )
        lines.append(f"conveyor {command}: {field}: {message} (set {variable}, or its flag where there is one)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.log_format:
        os.environ[logs.FORMAT_VARIABLE] = args.log_format  # every process started from here logs the same way
    logs.setup(args.log_level)
    if getattr(args, "redis_url", None):
        os.environ["CONVEYOR_REDIS_URL"] = args.redis_url  # every process started from here reads it too
    try:
        args.handler(args)
    except ValidationError as exc:
        raise SystemExit(settings_error(args.command, exc)) from None


if __name__ == "__main__":
    main()
