"""Hugging Face checkpoint directories: config.json + (sharded) *.safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json")
    return json.loads(path.read_text())


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files")
    return files


def iterate_safetensors(directory: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) of every tensor: indexing a slice reads only that part of the file.

    A tensor-parallel rank loads its rows or columns of each weight without
    ever holding the whole tensor. A slice is valid until the next one is
    asked for.
    """
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, handle.get_slice(name)
