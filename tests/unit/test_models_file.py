from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from conveyor.fleet import ModelSpec
from launcher import models_file
from launcher.models_file import ModelsFile


def test_the_repository_models_file_serves_the_two_cpu_models(repo_root: Path) -> None:
    config = models_file.load(repo_root / "models.toml")
    by_name = {m.name: m for m in config.models}
    assert by_name["all-minilm-l6-v2"].task == "embed"
    assert by_name["smollm2-135m-instruct"].task == "generate"
    binds = {m.cpu_threads_bind for m in config.models}
    assert len(binds) == 2  # the two engines are pinned to different cores


def test_one_worker_per_gpu_pinned_with_cuda_visible_devices() -> None:
    spec = ModelSpec(name="big", path="org/big", task="generate", gpus=["0", "3"], engine_args={"max_model_len": 8})
    workers = spec.workers()
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in workers] == ["0", "3"]
    args = workers[0][0]
    assert args[args.index("--model-path") + 1] == "org/big"
    assert json.loads(args[args.index("--engine-args") + 1]) == {"max_model_len": 8}


def test_replicas_on_cpu() -> None:
    spec = ModelSpec(name="m", replicas=3, cpu_threads_bind="1")
    workers = spec.workers()
    assert len(workers) == 3
    assert all(env == {"CONVEYOR_WORKER_CPU_THREADS_BIND": "1"} for _, env in workers)


def test_gpus_and_a_different_replica_count_conflict() -> None:
    with pytest.raises(ValidationError, match="either gpus"):
        ModelSpec(name="m", gpus=["0"], replicas=2)


def test_names_are_unique_and_unknown_keys_refused() -> None:
    with pytest.raises(ValidationError, match="listed twice"):
        ModelsFile(models=[ModelSpec(name="a"), ModelSpec(name="a")])
    with pytest.raises(ValidationError):
        ModelsFile.model_validate({"models": [{"name": "a", "gpu": ["0"]}]})


def test_two_models_on_one_gpu_are_refused_unless_both_share_it() -> None:
    with pytest.raises(ValidationError, match=r"GPU 1 is already assigned to model 'a'.*share_gpus"):
        ModelsFile(models=[ModelSpec(name="a", gpus=["0", "1"]), ModelSpec(name="b", gpus=["1"])])
    with pytest.raises(ValidationError, match="share_gpus"):
        ModelsFile(models=[ModelSpec(name="a", gpus=["1"], share_gpus=True), ModelSpec(name="b", gpus=["1"])])
    shared = [ModelSpec(name="a", gpus=["1"], share_gpus=True), ModelSpec(name="b", gpus=["1"], share_gpus=True)]
    assert len(ModelsFile(models=shared).models) == 2


def test_writing_the_fleet_back_keeps_comments_and_unchanged_models(repo_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text((repo_root / "models.toml").read_text())
    fleet = models_file.load(path).models
    changed = [
        fleet[0],
        fleet[1].model_copy(update={"replicas": 2}),
        ModelSpec(name="new", engine="fake", env={"A": "1"}),
    ]
    models_file.save(path, changed)
    text = path.read_text()
    assert "# The models `conveyor up` serves." in text and "# two engines on two cores" in text
    assert models_file.load(path).models == changed
    models_file.save(path, changed[1:])
    assert [m.name for m in models_file.load(path).models] == ["smollm2-135m-instruct", "new"]


def test_gpus_are_compared_as_sets_of_devices() -> None:
    with pytest.raises(ValidationError, match=r"GPU 1 is already assigned to model 'a'"):
        ModelsFile(models=[ModelSpec(name="a", gpus=["0,1"]), ModelSpec(name="b", gpus=["1"])])
    with pytest.raises(ValidationError, match="each GPU once"):
        ModelSpec(name="a", gpus=["0,1", "1"])
    with pytest.raises(ValidationError, match="each GPU once"):
        ModelSpec(name="a", gpus=["0,"])
    spec = ModelSpec(name="a", gpus=["0, 1", "2,3"])
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in spec.workers()] == ["0,1", "2,3"]
    assert len(ModelsFile(models=[spec, ModelSpec(name="b", gpus=["4"])]).models) == 2
