"""The file store, local and S3 (against moto's standalone S3-protocol server, a real process on loopback): the
same contract for both, the sweeper removing an expired file's bytes from either, and a batch run end to end with its
files in S3."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import pytest
from fakeredis.aioredis import FakeRedis

from conveyor import key_layout
from conveyor.batch_lines import FileObject, StoredFile
from conveyor.filestore import BLOCK_BYTES, FileStore, LocalFileStore, S3FileStore, lines, open_store
from conveyor.outage import Outage
from gateway.batch_store import BatchStore
from gateway.settings import GatewaySettings
from gateway.sweeper import Sweeper, Swept
from launcher import redis_server
from tests.conftest import Processes, wait_for
from tests.integration.test_batches import EMBEDDINGS, embedding_lines, finished, jsonl, upload, wait_batch

BUCKET = "conveyor-test"
S3_EMBED = "s3-embed"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = redis_server.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: answers(port), 30, "moto's S3 server")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, **_credentials()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileStore:
    if request.param == "local":
        return LocalFileStore(tmp_path / "files")
    endpoint = request.getfixturevalue("s3_endpoint")
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    made = open_store(f"s3://{BUCKET}/prefix-{os.getpid()}")
    assert isinstance(made, S3FileStore)
    return made


async def blocks(data: bytes, size: int = 3 << 20) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def read_all(store: FileStore, name: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([block async for block in store.read(name, start, end)])


async def test_the_store_contract(store: FileStore) -> None:
    big = b"".join(b"line %d\n" % i for i in range(2_000_000))  # ~17 MB: three multipart parts in S3
    assert await store.write("a/big.jsonl", blocks(big)) == len(big)
    assert await read_all(store, "a/big.jsonl") == big
    assert await read_all(store, "a/big.jsonl", 7, 7 + BLOCK_BYTES + 5) == big[7 : 7 + BLOCK_BYTES + 5]
    assert [line async for line in lines(store.read("a/big.jsonl", 0, 14))] == [b"line 0", b"line 1"]
    await store.write("a/big.jsonl", blocks(b"replaced\n"))  # written again: replaced whole
    assert await read_all(store, "a/big.jsonl") == b"replaced\n"
    await store.write("empty", blocks(b""))
    assert await read_all(store, "empty") == b""
    await store.delete("a/big.jsonl")
    await store.delete("a/big.jsonl")  # deleting what is gone is fine
    with pytest.raises(FileNotFoundError):
        await read_all(store, "a/big.jsonl")


async def test_a_write_that_fails_leaves_nothing(store: FileStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (9 << 20)  # past the first S3 part
        raise RuntimeError("the upload broke")

    with pytest.raises(RuntimeError):
        await store.write("half", broken())
    with pytest.raises(FileNotFoundError):
        await read_all(store, "half")


async def test_the_sweeper_removes_an_expired_files_bytes_from_the_store(store: FileStore) -> None:
    redis = FakeRedis()  # the store is the subject here: Redis only holds the record
    try:
        batches = BatchStore(redis)
        name = key_layout.stored_file_name("file-expiring")
        await store.write(name, blocks(b'{"custom_id": "a"}\n'))
        now = int(time.time())
        file = FileObject(
            id="file-expiring", bytes=19, created_at=now, filename="in.jsonl", purpose="batch", expires_at=now + 3600
        )
        await batches.save_file(StoredFile(file=file, store_name=name))
        sweeper = Sweeper(batches, store, GatewaySettings(), Outage(logging.getLogger("test"), "test"))
        assert await sweeper.sweep(now + 3599) == Swept()
        assert await read_all(store, name)
        assert await sweeper.sweep(now + 3600) == Swept(files=1)
        with pytest.raises(FileNotFoundError):
            await read_all(store, name)
        assert await batches.stored("file-expiring") is None
    finally:
        await redis.aclose()


def test_a_batch_runs_with_its_files_in_s3(s3_endpoint: str, redis_url: str, tmp_path: Path) -> None:
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint, "CONVEYOR_FILES_URL": f"s3://{BUCKET}/batches-{os.getpid()}"}
    procs = Processes(redis_url, env=env)
    try:
        # a model of its own: the session's other workers use another store and must not take these chunks
        gateway = procs.gateway(models=S3_EMBED)
        procs.fake_worker(S3_EMBED, embed=True)
        client = gateway.client()
        batch = client.batches.create(
            input_file_id=upload(client, tmp_path, embedding_lines(70, S3_EMBED)),
            endpoint=EMBEDDINGS,
            completion_window="24h",
        )
        batch = wait_batch(client, batch.id, finished)
        assert batch.status == "completed"
        assert len(jsonl(client, batch.output_file_id)) == 70
        listed = boto3.client("s3", endpoint_url=s3_endpoint, **_credentials()).list_objects_v2(Bucket=BUCKET)
        assert any(o["Key"].endswith(f"{batch.output_file_id}.jsonl") for o in listed.get("Contents", []))
    finally:
        procs.stop_all()
