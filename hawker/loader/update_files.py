"""The safetensors files of a weight update, checked before any of their data is read.

A weight update comes from outside (a trainer, over HTTP), so its directory
is treated as untrusted: every file opened must resolve (symlinks followed)
to a regular file inside that directory, even when an index file names it;
each file's header is parsed and checked here (length, JSON, names, dtypes,
shapes, byte ranges that tile the data exactly) instead of trusting the
library that reads it later. Every problem is a ``ValueError`` that names
the file and the tensor.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
# Bytes per element of the dtypes a weight may arrive in (floating point only: an integer or
# boolean tensor in place of a weight is a mistake, not something to convert silently).
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# safetensors' own limit on the JSON header; a larger length field means a corrupt file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorHeader:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class UpdateFiles:
    """The checked files of one update and the tensors each holds."""

    directory: Path  # resolved
    files: tuple[Path, ...]  # resolved, each inside ``directory``
    tensors: tuple[TensorHeader, ...]

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(tensor.name, tensor.shape) for tensor in self.tensors]

    def weights(self) -> Iterator[tuple[str, Any]]:
        """(name, lazy slice) of every tensor, from the checked files only."""
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                        yield name, handle.get_slice(name)
            except SafetensorError as error:  # the file changed after it was checked
                raise ValueError(f"{file.name}: {error}") from None


def open_update(path: str | Path, allowed_roots: Sequence[Path] = ()) -> UpdateFiles:
    """Check the directory of an update and every safetensors file in it (see the module docstring).

    ``allowed_roots``: when given, the directory must lie under one of them.
    """
    directory = confined_directory(path, allowed_roots)
    index = _read_index(directory) if (directory / INDEX_NAME).exists() else None
    shard_files = {shard: _inside(directory, shard) for shard in sorted(set(index.values()))} if index else {}
    if index is not None and not shard_files:
        raise ValueError(f"{INDEX_NAME} names no files")
    files = sorted(set(shard_files.values())) if index is not None else _listed_files(directory)
    tensors: list[TensorHeader] = []
    owner: dict[str, Path] = {}
    for file in files:
        for tensor in read_header(file):
            if tensor.name in owner:
                raise ValueError(f"tensor {tensor.name!r} is in both {owner[tensor.name].name} and {file.name}")
            owner[tensor.name] = file
            tensors.append(tensor)
    if not tensors:
        raise ValueError(f"{directory} holds no tensors")
    if index is not None:
        _check_index_agrees(index, shard_files, owner)
    return UpdateFiles(directory, tuple(files), tuple(tensors))


def confined_directory(path: str | Path, allowed_roots: Sequence[Path] = ()) -> Path:
    """``path`` resolved (symlinks followed); it must be a directory, under one of ``allowed_roots`` if any."""
    if not str(path).strip():
        raise ValueError("path is empty: give the directory of the new safetensors files")
    try:
        directory = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as error:  # missing, unreadable, or a symlink loop
        raise ValueError(f"path {str(path)!r} cannot be opened: {error.__class__.__name__}") from None
    if not directory.is_dir():
        raise ValueError(f"path {str(path)!r} is not a directory")
    roots = [Path(root).resolve() for root in allowed_roots]
    if roots and not any(directory.is_relative_to(root) for root in roots):
        shown = ", ".join(str(root) for root in roots)
        raise ValueError(f"path {str(path)!r} is outside the allowed weight roots ({shown})")
    return directory


def _inside(directory: Path, name: str) -> Path:
    """The regular file ``name`` names in ``directory``: relative, and inside it once symlinks are followed."""
    if not name or Path(name).is_absolute() or "\x00" in name:
        raise ValueError(f"{name!r} is not a file name relative to the update directory")
    try:
        file = (directory / name).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ValueError(f"{name!r} does not exist in {directory}") from None
    if not file.is_relative_to(directory):
        raise ValueError(f"{name!r} leads outside the update directory {directory}")
    if not stat.S_ISREG(file.stat().st_mode):  # a FIFO or a device would block or never end
        raise ValueError(f"{name!r} is not a regular file")
    return file


def _listed_files(directory: Path) -> list[Path]:
    names = sorted(entry.name for entry in directory.iterdir() if entry.name.endswith(".safetensors"))
    if not names:
        raise ValueError(f"{directory} has no *.safetensors files")
    return [_inside(directory, name) for name in names]


def _read_index(directory: Path) -> dict[str, str]:
    file = _inside(directory, INDEX_NAME)
    if file.stat().st_size > MAX_INDEX_BYTES:
        raise ValueError(f"{INDEX_NAME} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        index = json.loads(file.read_bytes())
    except (ValueError, RecursionError):
        raise ValueError(f"{INDEX_NAME} is not valid JSON") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(shard, str) for name, shard in weight_map.items()
    ):
        raise ValueError(f'{INDEX_NAME} needs a "weight_map" object of tensor name -> file name')
    return weight_map


def _check_index_agrees(index: dict[str, str], shard_files: dict[str, Path], owner: dict[str, Path]) -> None:
    """Every tensor is where the index says, and the index lists every tensor."""
    for name, shard in index.items():
        if owner.get(name) != shard_files[shard]:
            raise ValueError(f"{INDEX_NAME} puts {name!r} in {shard}, which does not hold it")
    unlisted = sorted(set(owner) - set(index))
    if unlisted:
        raise ValueError(f"{INDEX_NAME} does not list {unlisted[0]!r} ({len(unlisted)} tensor(s) unlisted)")


def read_header(file: Path) -> list[TensorHeader]:
    """The tensors a safetensors file declares, after checking that its header describes its bytes exactly."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file.name}: too short for a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file.name}: header length {length} does not fit the file ({size} bytes)")
        raw = handle.read(length)
    header = _parse_header(file, raw)
    header.pop("__metadata__", None)
    return _check_entries(file, header, data_bytes=size - 8 - length)


def _parse_header(file: Path, raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{file.name}: the header names a tensor twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError:
        raise ValueError(f"{file.name}: the header is not UTF-8") from None
    except RecursionError:
        raise ValueError(f"{file.name}: the header is not a safetensors header") from None
    except json.JSONDecodeError:
        raise ValueError(f"{file.name}: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file.name}: the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{file.name}: __metadata__ must map strings to strings")
    return header


def _check_entries(file: Path, header: dict[str, Any], data_bytes: int) -> list[TensorHeader]:
    tensors: list[TensorHeader] = []
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        tensor, begin, end = _check_entry(file, name, entry)
        tensors.append(tensor)
        ranges.append((begin, end, name))
    # The byte ranges must tile the data from 0 to its end: no gap, no overlap, nothing past the file.
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise ValueError(f"{file.name}: {name!r} starts at byte {begin} of the data, expected {position}")
        position = end
    if position != data_bytes:
        raise ValueError(f"{file.name}: the tensors cover {position} bytes of data, the file holds {data_bytes}")
    return tensors


def _check_entry(file: Path, name: str, entry: Any) -> tuple[TensorHeader, int, int]:
    where = f"{file.name}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where} has dtype {dtype!r}; weights must be one of {', '.join(FLOAT_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{where} has shape {shape!r}; it must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ValueError(f"{where} has data_offsets {offsets!r}; they must be [begin, end] byte positions")
    begin, end = offsets
    expected = math.prod(shape) * FLOAT_DTYPES[dtype]
    if end - begin != expected:
        raise ValueError(f"{where}: {dtype} {shape} needs {expected} bytes, its data_offsets hold {end - begin}")
    return TensorHeader(name, dtype, tuple(shape)), begin, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
