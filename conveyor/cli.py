"""The ``conveyor`` command: ``gateway``, ``worker`` (and ``up``, which runs everything)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """Flags given on the command line override the environment; absent ones leave it alone."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(**_overrides(args, ["host", "port", "models"]))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level.lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
    )


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run
    from worker.settings import WorkerSettings

    overrides = _overrides(
        args, ["model", "model_path", "engine", "task", "max_jobs", "poll_delay", "metrics_port", "fake_token_delay"]
    )
    if args.engine_args is not None:
        overrides["engine_args"] = json.loads(args.engine_args)
    raise SystemExit(run(WorkerSettings(**overrides)))


def _up(args: argparse.Namespace) -> None:
    from conveyor.up import serve

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    gateway = commands.add_parser("gateway", help="serve the OpenAI-compatible HTTP API")
    gateway.add_argument("--host")
    gateway.add_argument("--port", type=int)
    gateway.add_argument("--models", help="comma-separated served model names this deployment expects")
    gateway.set_defaults(handler=_gateway)

    worker = commands.add_parser("worker", help="serve one model's queue with one engine")
    worker.add_argument("--model", help="served model name (the queue to drain)")
    worker.add_argument("--model-path", dest="model_path", help="local folder or Hugging Face id of the weights")
    worker.add_argument("--engine", choices=["vllm", "fake"], help="fake is a test/benchmark tool")
    worker.add_argument("--task", choices=["auto", "generate", "embed"])
    worker.add_argument("--engine-args", dest="engine_args", help="JSON object of vLLM engine arguments")
    worker.add_argument("--max-jobs", dest="max_jobs", type=int)
    worker.add_argument("--poll-delay", dest="poll_delay", type=float)
    worker.add_argument("--metrics-port", dest="metrics_port", type=int)
    worker.add_argument("--fake-token-delay", dest="fake_token_delay", type=float)
    worker.set_defaults(handler=_worker)

    up = commands.add_parser("up", help="run Redis, a worker per model in the models file, and the gateway")
    up.add_argument("--models-file", default="models.toml", help="TOML file of models to serve (default: %(default)s)")
    up.add_argument("--host", default="0.0.0.0")
    up.add_argument("--port", type=int, default=8000)
    up.set_defaults(handler=_up)

    batch = commands.add_parser("batch", help="bulk work through the Batches API").add_subparsers(
        dest="batch_command", required=True
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


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args.handler(args)


if __name__ == "__main__":
    main()
