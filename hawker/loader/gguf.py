"""GGUF files of the ``llama`` architecture, dequantised at load.

GGUF metadata is translated into Hugging Face config keys so that the rest
of Hawker sees one kind of config. llama.cpp's converter permutes the rows of
Q and K (interleaved rotary pairs); ``_unpermute`` restores HF's layout.

The header is parsed here with ``struct`` over a memory map: the ``gguf``
package's ``GGUFReader`` builds a numpy view per value of every metadata
array, ~4 s for the default model's 49k-token vocabulary and 48k merges
(all of start-up's other parsing is a tenth of that). Only the values a
config needs are decoded; string arrays are skipped, their length kept.
Tensors are dequantised with ``gguf.quants``.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_VERSIONS = (2, 3)
# Metadata value types of a fixed width: their struct format.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
# Stored as plain values: the numpy type their bytes are viewed as.
_VALUE_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first)
    kind: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (string arrays as their lengths) and tensor table, over a memory map."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    data: np.ndarray  # the whole file, uint8, memory-mapped

    def field(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key)
        return default if value is None else value

    def tensor_data(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's stored values (float types) or blocks (uint8 rows), as ``gguf.quants.dequantize`` takes them."""
        raw = self.data[tensor.offset : tensor.offset + tensor.nbytes]
        if tensor.kind in _VALUE_DTYPES:
            return raw.view(_VALUE_DTYPES[tensor.kind]).reshape(tensor.shape)
        return raw.reshape(quant_shape_to_byte_shape(tensor.shape, tensor.kind))


class _Cursor:
    def __init__(self, data: np.ndarray, path: Path) -> None:
        self.buffer = memoryview(data)  # type: ignore[arg-type]  # numpy arrays are buffers
        self.pos = 0
        self.path = path

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start, self.pos = self.pos, self.pos + length
        return bytes(self.buffer[start : self.pos]).decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {kind}")
        element, count = self.unpack("IQ")
        if element in _SCALAR_FORMATS:
            return list(self.unpack(f"{count}{_SCALAR_FORMATS[element]}"))
        if element != _STRING:
            raise ValueError(f"{self.path}: GGUF arrays of type {element} are not supported")
        for _ in range(count):  # a vocabulary or merge table: skipped (the tokenizer reads it)
            (length,) = struct.unpack_from("<Q", self.buffer, self.pos)
            self.pos += 8 + length
        return count


def open_gguf(path: Path) -> GGUFFile:
    """Parse ``path``'s header and tensor table; tensor data stays on disk until dequantised."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(data, path)
    if bytes(cursor.buffer[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    cursor.pos = 4
    (version,) = cursor.unpack("I")
    if version not in _VERSIONS:
        raise ValueError(
            f"{path} is GGUF version {version}; supported: {', '.join(map(str, _VERSIONS))} (little-endian)"
        )
    num_tensors, num_fields = cursor.unpack("QQ")
    metadata: dict[str, Any] = {}
    for _ in range(num_fields):
        key = cursor.string()
        (kind,) = cursor.unpack("I")
        metadata[key] = cursor.value(kind)
    table = []
    for _ in range(num_tensors):
        name = cursor.string()
        (num_dims,) = cursor.unpack("I")
        dims = cursor.unpack(f"{num_dims}Q")
        kind, offset = cursor.unpack("IQ")
        table.append((name, tuple(reversed(dims)), kind, offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    start = -(-cursor.pos // alignment) * alignment
    tensors = tuple(_tensor(path, name, shape, kind, start + offset) for name, shape, kind, offset in table)
    return GGUFFile(path, metadata, tensors, data)


def _tensor(path: Path, name: str, shape: tuple[int, ...], kind: int, offset: int) -> GGUFTensor:
    try:
        quant = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[quant]
    except (ValueError, KeyError):
        raise ValueError(f"{path}: tensor {name!r} has GGML type {kind}, which is not supported") from None
    return GGUFTensor(name, shape, quant, offset, int(np.prod(shape, dtype=np.int64)) // block * size)


def read_gguf_config(file: GGUFFile) -> dict[str, Any]:
    arch = file.field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama")
    tensor_names = {t.name for t in file.tensors}
    heads = int(file.field("llama.attention.head_count"))
    hidden = int(file.field("llama.embedding_length"))
    vocab = file.field("llama.vocab_size") or file.field("tokenizer.ggml.tokens")  # a string array: its length
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(file.field("llama.feed_forward_length")),
        "num_hidden_layers": int(file.field("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(file.field("llama.attention.head_count_kv", heads)),
        "head_dim": int(file.field("llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(file.field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(file.field("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(file.field("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": file.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": file.field("tokenizer.ggml.eos_token_id"),
    }
    scaling = file.field("llama.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(file.field("llama.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    return config


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K projection."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _dequantize(data: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """``gguf.quants.dequantize``, with Q4_1 (the default model's projections) done in torch.

    gguf's numpy code took 2.7 of the 3.6 s that loading the default model
    took, in a start-up that must stay under 15 s (benchmarks/NOTES.md);
    the same float32 multiply-then-add in torch gives the same bits.
    """
    if kind != GGMLQuantizationType.Q4_1:
        return dequantize(data, kind)
    block_size, type_size = GGML_QUANT_SIZES[kind]
    with warnings.catch_warnings():  # a read-only memory map: torch warns, but the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.ascontiguousarray(data))
    blocks = raw.reshape(-1, type_size)
    # A block: scale d and minimum m (float16 each), then 16 bytes whose low
    # nibbles are the first 16 values and whose high nibbles the last 16.
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).float()
    packed = blocks[:, 4:]
    values = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()
    weights = scale * values + minimum
    return weights.reshape(*data.shape[:-1], data.shape[-1] // type_size * block_size).numpy()


def iterate_gguf(file: GGUFFile, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in file.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} is not supported")
        weight = _dequantize(file.tensor_data(tensor), tensor.kind)
        if ".q_proj." in name:
            weight = _unpermute(weight, config["num_attention_heads"])
        elif ".k_proj." in name:
            weight = _unpermute(weight, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(weight, dtype=np.float32, copy=True))
