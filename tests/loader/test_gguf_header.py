"""Hawker's GGUF header parser (hawker/loader/gguf.py) against the ``gguf`` package's ``GGUFReader``.

It reads the default model's file both ways: every scalar and numeric-array
metadata value, every string array's length, and every tensor's name, shape,
type and bytes must agree. The GGUF tokenizer built directly must encode and
decode as the one ``AutoTokenizer`` picks.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize
from transformers import AutoTokenizer

from hawker.loader.checkpoint import default_model_path
from hawker.loader.gguf import _dequantize, open_gguf
from hawker.loader.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def reference() -> GGUFReader:
    return GGUFReader(str(default_model_path()))


def test_metadata_matches_gguf_reader(reference: GGUFReader) -> None:
    ours = open_gguf(default_model_path())
    assert set(ours.metadata) == set(reference.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in ours.metadata.items():
        field = reference.fields[key]
        if field.types[:2] == [GGUFValueType.ARRAY, GGUFValueType.STRING]:
            assert value == len(field.data), key  # string arrays: their length
        else:
            assert value == pytest.approx(field.contents()), key


def test_tensors_match_gguf_reader(reference: GGUFReader) -> None:
    ours = open_gguf(default_model_path())
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors, strict=True):
        assert mine.kind == theirs.tensor_type, mine.name
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape)), mine.name
        assert np.array_equal(ours.tensor_data(mine), theirs.data), mine.name


def test_dequantized_tensors_have_gguf_packages_bits(reference: GGUFReader) -> None:
    """Hawker's own Q4_1 dequantisation against gguf's numpy one, on every tensor of the default model."""
    ours = open_gguf(default_model_path())
    kinds = set()
    for tensor in ours.tensors:
        data = ours.tensor_data(tensor)
        kinds.add(tensor.kind)
        assert np.array_equal(_dequantize(data, tensor.kind), dequantize(data, tensor.kind)), tensor.name
    assert GGMLQuantizationType.Q4_1 in kinds  # the fast path ran


def test_gguf_tokenizer_matches_auto_tokenizer() -> None:
    path = default_model_path()
    auto = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    direct = load_tokenizer(path)
    assert type(direct) is type(auto)
    text = "Hello, world! <|im_start|>user\nWhat's 2+2?<|im_end|> ünïcode 🙂"
    ids = auto(text).input_ids
    assert direct(text).input_ids == ids
    assert direct.decode(ids) == auto.decode(ids)
    assert direct.all_special_ids == auto.all_special_ids
    assert direct.chat_template == auto.chat_template
