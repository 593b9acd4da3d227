"""Memory of the gateway and a worker while a 200 MB, 50,000-line batch file is uploaded and run.

    uv run --frozen --extra cpu python -m bench.bulk_memory [--lines 50000] [--line-bytes 4000]

OpenAI's limits are 200 MB and 50,000 lines per file, so the largest file holds ~4 KB per line. The worker runs the
fake engine (this measures Conveyor's own memory, not a model's); every line must come back in the output file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from bench.bulk import PeakRss, complete, upload
from bench.common import machine, stack, table

MODEL = "fake-embed"


def write_file(path: Path, lines: int, line_bytes: int) -> int:
    filler = "lorem ipsum dolor sit amet " * (line_bytes // 27 + 1)
    with path.open("w") as out:
        for i in range(lines):
            text = f"{i} {filler}"[: line_bytes - 120]
            body = {"model": MODEL, "input": text}
            out.write(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings", "body": body}))
            out.write("\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--line-bytes", type=int, default=4_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CONVEYOR_FILES_URL"] = str(Path(tmp) / "files")
        jsonl = Path(tmp) / "input.jsonl"
        size = write_file(jsonl, args.lines, args.line_bytes)
        with stack([MODEL]) as running:
            worker = running.worker(MODEL, "--engine", "fake", "--task", "embed")
            client = OpenAI(base_url=f"{running.base_url}/v1", api_key="none", timeout=900)
            with PeakRss({"gateway": running.children[0].pid, "worker": worker.pid}) as upload_rss:
                started = time.perf_counter()
                file_id = upload(client, jsonl)
                upload_seconds = time.perf_counter() - started
            with PeakRss({"gateway": running.children[0].pid, "worker": worker.pid}) as batch_rss:
                batch_seconds, batch = complete(client, file_id, args.lines)
            output = client.files.content(str(batch.output_file_id)).text.splitlines()
            assert len(output) == args.lines
    print(f"Batch file {size / 1e6:.0f} MB, {args.lines} lines, fake embedding engine, {machine()}\n")
    print(
        table(
            ["phase", "seconds", "gateway peak RSS MiB", "worker peak RSS MiB"],
            [
                ["upload (checked line by line)", f"{upload_seconds:.1f}", f"{upload_rss.peak['gateway']:.0f}",
                 f"{upload_rss.peak['worker']:.0f}"],
                ["batch (create to completed)", f"{batch_seconds:.1f}", f"{batch_rss.peak['gateway']:.0f}",
                 f"{batch_rss.peak['worker']:.0f}"],
            ],
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
