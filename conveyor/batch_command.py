"""``conveyor batch embed INPUT --model NAME -o OUTPUT.jsonl``: embed a file of texts through the Batches API.

INPUT is a text file (one text per line; line N becomes the request ``line-N``) or an OpenAI batch JSONL file. The
command uploads it, creates the batch, shows a progress bar from the batch's ``request_counts``, and writes the
output file to OUTPUT (and refused lines to ``OUTPUT.errors.jsonl``). It talks to the API with the official
``openai`` SDK, like any other client.

Ctrl-C leaves the batch running; the same command run again re-attaches to it (the batch id is kept beside the
output, in ``OUTPUT.batch.json``, until the output is written).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from openai import OpenAI
from openai.types import Batch
from tqdm import tqdm

ENDPOINT: Final = "/v1/embeddings"
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Attachment:
    """What ``OUTPUT.batch.json`` remembers, so a second run finds the first run's batch."""

    batch_id: str
    input: str
    input_bytes: int
    model: str

    @classmethod
    def load(cls, path: Path) -> Attachment | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def is_batch_jsonl(path: Path) -> bool:
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(first, dict) and "custom_id" in first
    return False


def batch_input(path: Path, model: str, into: Path) -> Path:
    """The batch JSONL for ``path``: itself when it is one, else one embedding request per non-empty text line."""
    if is_batch_jsonl(path):
        return path
    with path.open(encoding="utf-8") as texts, into.open("w", encoding="utf-8") as out:
        for number, text in enumerate(texts, start=1):
            text = text.rstrip("\n")
            if text.strip():
                body = {"model": model, "input": text}
                line = {"custom_id": f"line-{number}", "method": "POST", "url": ENDPOINT, "body": body}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return into


def start(client: OpenAI, source: Path, model: str) -> Batch:
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = batch_input(source, model, Path(tmp) / f"{source.stem}.jsonl")
        with jsonl.open("rb") as handle:
            uploaded = client.files.create(file=handle, purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h", metadata={"source": source.name}
    )


def follow(client: OpenAI, batch: Batch, poll: float) -> Batch:
    """Poll until the batch ends, with a progress bar of its lines."""
    with tqdm(total=0, unit="line", desc=batch.id, dynamic_ncols=True) as bar:
        while True:
            counts = batch.request_counts
            if counts is not None and counts.total:
                bar.total = counts.total
                bar.n = counts.completed + counts.failed
                bar.set_postfix_str(f"{batch.status}, {counts.failed} failed")
            else:
                bar.set_postfix_str(batch.status)
            bar.refresh()
            if batch.status in FINAL:
                return batch
            time.sleep(poll)
            batch = client.batches.retrieve(batch.id)


def download(client: OpenAI, file_id: str, to: Path) -> None:
    partial = to.with_name(to.name + ".partial")
    with client.files.with_streaming_response.content(file_id) as response:
        response.stream_to_file(partial)
    partial.replace(to)


def embed(source: Path, model: str, output: Path, base_url: str, api_key: str, poll: float) -> int:
    client = OpenAI(base_url=base_url, api_key=api_key)
    state = output.with_name(output.name + ".batch.json")
    wanted = Attachment("", str(source.resolve()), source.stat().st_size, model)
    attached = Attachment.load(state)
    if attached and (attached.input, attached.input_bytes, attached.model) == (wanted.input, wanted.input_bytes, model):
        batch = client.batches.retrieve(attached.batch_id)
        print(f"re-attached to {batch.id} ({batch.status})", file=sys.stderr)
    else:
        batch = start(client, source, model)
        wanted.batch_id = batch.id
        state.write_text(json.dumps(asdict(wanted)))
        print(f"created {batch.id}; Ctrl-C leaves it running, run this again to re-attach", file=sys.stderr)
    try:
        batch = follow(client, batch, poll)
    except KeyboardInterrupt:
        print(f"\nleft {batch.id} running; run the same command again to re-attach", file=sys.stderr)
        return 130
    if batch.status == "failed":
        for error in batch.errors.data if batch.errors and batch.errors.data else []:
            print(f"line {error.line}: {error.message}", file=sys.stderr)
        state.unlink(missing_ok=True)
        return 1
    if batch.output_file_id:
        download(client, batch.output_file_id, output)
    if batch.error_file_id:
        download(client, batch.error_file_id, output.with_name(output.name + ".errors.jsonl"))
    state.unlink(missing_ok=True)
    counts = batch.request_counts
    done = f"{counts.completed} embedded, {counts.failed} failed of {counts.total}" if counts else ""
    print(f"{batch.id} {batch.status}: {done}; output in {output}", file=sys.stderr)
    return 0 if batch.status == "completed" else 2


def default_base_url() -> str:
    return os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1")


def default_api_key() -> str:
    return os.environ.get("CONVEYOR_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
