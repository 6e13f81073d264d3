"""Weight-update directories (hawker/loader/update_files.py): confined to the directory, headers checked first."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hawker import LLM
from hawker.loader.update_files import INDEX_NAME, confined_directory, open_update, read_header

NAME = "model.norm.weight"


def _write(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good(directory: Path, name: str = NAME, file: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.ones(64)}, directory / file)
    return directory


def _entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": shape or [4], "data_offsets": offsets or [0, 16]}


def test_a_good_directory_lists_its_tensors(tmp_path: Path) -> None:
    update = open_update(_good(tmp_path / "up"))
    assert update.shapes() == [(NAME, (64,))]
    (name, tensor), *rest = list(update.weights())
    assert name == NAME and not rest and torch.equal(tensor[:], torch.ones(64))


# Each builder writes one broken file into the directory it is given.
BROKEN_FILES: dict[str, Callable[[Path], object]] = {
    "empty file": lambda d: (d / "a.safetensors").write_bytes(b""),
    "header longer than the file": lambda d: (d / "a.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}"),
    "huge header length": lambda d: (d / "a.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}"),
    "header not JSON": lambda d: (d / "a.safetensors").write_bytes(struct.pack("<Q", 3) + b"{x}"),
    "header not UTF-8": lambda d: (d / "a.safetensors").write_bytes(struct.pack("<Q", 2) + b"\xff\xfe"),
    "header a list": lambda d: _write(d / "a.safetensors", [], b""),  # type: ignore[arg-type]
    "integer dtype": lambda d: _write(d / "a.safetensors", {NAME: _entry("I32")}, bytes(16)),
    "bool dtype": lambda d: _write(d / "a.safetensors", {NAME: _entry("BOOL", offsets=[0, 4])}, bytes(4)),
    "fp8 dtype": lambda d: _write(d / "a.safetensors", {NAME: _entry("F8_E4M3", offsets=[0, 4])}, bytes(4)),
    "unknown dtype": lambda d: _write(d / "a.safetensors", {NAME: _entry("Q4")}, bytes(16)),
    "dtype not a string": lambda d: _write(d / "a.safetensors", {NAME: _entry(["F32"])}, bytes(16)),  # type: ignore[arg-type]
    "negative dimension": lambda d: _write(d / "a.safetensors", {NAME: _entry(shape=[-4])}, bytes(16)),
    "fractional dimension": lambda d: _write(d / "a.safetensors", {NAME: _entry(shape=[4.0])}, bytes(16)),
    "boolean dimension": lambda d: _write(d / "a.safetensors", {NAME: _entry(shape=[True])}, bytes(16)),
    "shape not a list": lambda d: _write(d / "a.safetensors", {NAME: _entry(shape="4")}, bytes(16)),  # type: ignore[arg-type]
    "too few bytes for the shape": lambda d: _write(d / "a.safetensors", {NAME: _entry(shape=[8])}, bytes(16)),
    "offsets past the data": lambda d: _write(d / "a.safetensors", {NAME: _entry(offsets=[16, 32])}, bytes(16)),
    "reversed offsets": lambda d: _write(d / "a.safetensors", {NAME: _entry(offsets=[16, 0])}, bytes(16)),
    "one offset": lambda d: _write(d / "a.safetensors", {NAME: _entry(offsets=[16])}, bytes(16)),
    "truncated data": lambda d: _write(d / "a.safetensors", {NAME: _entry()}, bytes(10)),
    "trailing bytes": lambda d: _write(d / "a.safetensors", {NAME: _entry()}, bytes(20)),
    "overlapping tensors": lambda d: _write(
        d / "a.safetensors", {NAME: _entry(), "lm_head.weight": _entry(offsets=[8, 24])}, bytes(24)
    ),
    "extra entry key": lambda d: _write(d / "a.safetensors", {NAME: {**_entry(), "x": 1}}, bytes(16)),
    "entry not an object": lambda d: _write(d / "a.safetensors", {NAME: [1, 2]}, bytes(0)),
    "metadata not strings": lambda d: _write(
        d / "a.safetensors", {"__metadata__": {"a": 1}, NAME: _entry()}, bytes(16)
    ),
    "duplicate tensor in a header": lambda d: (d / "a.safetensors").write_bytes(
        _duplicate_header(b'{"%s": %s, "%s": %s}')
    ),
    "a tensor in two files": lambda d: (_good(d, file="a.safetensors"), _good(d, file="b.safetensors")),
    "no tensors": lambda d: _write(d / "a.safetensors", {"__metadata__": {"format": "pt"}}, b""),
    "no safetensors files": lambda d: (d / "weights.bin").write_bytes(b"x"),
    "a directory named like a file": lambda d: (d / "a.safetensors").mkdir(),
    "a FIFO named like a file": lambda d: os.mkfifo(d / "a.safetensors"),
}


def _duplicate_header(template: bytes) -> bytes:
    entry = json.dumps(_entry()).encode()
    raw = template % (NAME.encode(), entry, NAME.encode(), entry)
    return struct.pack("<Q", len(raw)) + raw + bytes(16)


@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
def test_a_broken_file_is_refused_with_a_value_error(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "up"
    directory.mkdir()
    BROKEN_FILES[kind](directory)
    with pytest.raises(ValueError):
        open_update(directory)


def _index(directory: Path, weight_map: object) -> None:
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_files_outside_the_directory_are_never_opened(tmp_path: Path) -> None:
    outside = _good(tmp_path / "elsewhere")
    directory = _good(tmp_path / "up")
    # The index names files outside, by a relative path, an absolute path and a symlink.
    for shard in ("../elsewhere/model.safetensors", str(outside / "model.safetensors")):
        _index(directory, {NAME: shard})
        with pytest.raises(ValueError, match=r"outside|relative"):
            open_update(directory)
    (directory / "link.safetensors").symlink_to(outside / "model.safetensors")
    _index(directory, {NAME: "link.safetensors"})
    with pytest.raises(ValueError, match="outside"):
        open_update(directory)
    # Without an index, every *.safetensors is read: a symlink out is refused just the same.
    (directory / INDEX_NAME).unlink()
    with pytest.raises(ValueError, match="outside"):
        open_update(directory)
    # The index itself may not point out either.
    (directory / "link.safetensors").unlink()
    (tmp_path / "elsewhere" / INDEX_NAME).write_text(json.dumps({"weight_map": {NAME: "model.safetensors"}}))
    (directory / INDEX_NAME).symlink_to(tmp_path / "elsewhere" / INDEX_NAME)
    with pytest.raises(ValueError, match="outside"):
        open_update(directory)
    # A symlink that stays inside is fine.
    (directory / INDEX_NAME).unlink()
    (directory / "sub").mkdir()
    shutil.move(directory / "model.safetensors", directory / "sub" / "real.safetensors")
    (directory / "model.safetensors").symlink_to(directory / "sub" / "real.safetensors")
    assert open_update(directory).shapes() == [(NAME, (64,))]


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        json.dumps([1]),
        json.dumps({"metadata": {}}),
        json.dumps({"weight_map": [NAME]}),
        json.dumps({"weight_map": {NAME: 5}}),
        json.dumps({"weight_map": {}}),
        json.dumps({"weight_map": {NAME: "missing.safetensors"}}),
        json.dumps({"weight_map": {NAME: "model.safetensors", "lm_head.weight": "model.safetensors"}}),
        json.dumps({"weight_map": {NAME: ""}}),
    ],
)
def test_a_bad_index_is_refused(tmp_path: Path, index: str) -> None:
    directory = _good(tmp_path / "up")
    (directory / INDEX_NAME).write_text(index)
    with pytest.raises(ValueError):
        open_update(directory)


def test_the_index_must_agree_with_the_files(tmp_path: Path) -> None:
    directory = _good(tmp_path / "up")
    _good(directory, name="lm_head.weight", file="other.safetensors")
    _index(directory, {NAME: "other.safetensors", "lm_head.weight": "other.safetensors"})
    with pytest.raises(ValueError, match="does not hold"):
        open_update(directory)
    _index(directory, {"lm_head.weight": "other.safetensors"})
    assert [name for name, _ in open_update(directory).shapes()] == ["lm_head.weight"]  # only indexed files
    _index(directory, {NAME: "model.safetensors", "lm_head.weight": "other.safetensors"})
    assert sorted(name for name, _ in open_update(directory).shapes()) == ["lm_head.weight", NAME]


def test_the_directory_is_resolved_and_confined_to_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inside = _good(root / "step-1")
    outside = _good(tmp_path / "other")
    assert confined_directory(inside, [root]) == inside.resolve()
    assert confined_directory(str(root / "step-1" / ".." / "step-1"), [root]) == inside.resolve()
    with pytest.raises(ValueError, match="outside the allowed"):
        confined_directory(outside, [root])
    with pytest.raises(ValueError, match="outside the allowed"):
        confined_directory(root / ".." / "other", [root])
    (root / "sneaky").symlink_to(outside)  # a symlink under the root that leads out of it
    with pytest.raises(ValueError, match="outside the allowed"):
        confined_directory(root / "sneaky", [root])
    for bad in ("", "   ", str(tmp_path / "missing"), str(inside / "model.safetensors"), "a\x00b"):
        with pytest.raises(ValueError):
            confined_directory(bad)


def test_read_header_reports_the_declared_tensors(tmp_path: Path) -> None:
    file = _write(tmp_path / "a.safetensors", {"__metadata__": {"k": "v"}, NAME: _entry("BF16", [2, 4])}, bytes(16))
    (tensor,) = read_header(file)
    assert (tensor.name, tensor.dtype, tensor.shape) == (NAME, "BF16", (2, 4))


def test_a_strange_file_leaves_the_engine_untouched(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32")
    before = llm.engine.runner.model.model.norm.weight.detach().clone()
    directory = tmp_path / "up"
    directory.mkdir()
    # A good file first (sorted before the bad one): nothing of it may be written either.
    save_file({NAME: torch.zeros(64)}, directory / "a.safetensors")
    _write(
        directory / "b.safetensors",
        {"model.layers.0.input_layernorm.weight": _entry("I32", [64], [0, 256])},
        bytes(256),
    )
    with pytest.raises(ValueError, match="dtype"):
        llm.update_weights(directory)
    assert llm.weight_version == 0
    assert torch.equal(llm.engine.runner.model.model.norm.weight, before)
