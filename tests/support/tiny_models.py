"""Tiny random-weight checkpoints built offline with transformers, saved as safetensors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hawker.layers.quant import INT4_GROUP_SIZE

VOCAB_SIZE = 384
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    # Wider than the default 0.02 so logits are spread out and greedy
    # choices are not near-ties decided by float rounding.
    "initializer_range": 0.3,
    "bos_token_id": 1,
    "eos_token_id": None,
}

# Each architecture exercises a different part of the loader/model.
_VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    # untied embeddings, llama3 rope scaling
    "llama": (
        transformers.LlamaConfig,
        {
            "tie_word_embeddings": False,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    # tied embeddings, linear rope scaling
    "mistral": (
        transformers.MistralConfig,
        {"tie_word_embeddings": True, "sliding_window": None, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    # qkv bias
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True, "rope_theta": 1000000.0}),
    # q/k norm, explicit head_dim different from hidden/heads
    "qwen3": (transformers.Qwen3Config, {"tie_word_embeddings": False, "head_dim": 32}),
}

_MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Hawker serves language models with a paged cache and continuous batching.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 20

# A minimal chat template, so the server's chat endpoint can be tested.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_checkpoint(arch: str, directory: Path, max_positions: int = 256) -> Path:
    config_cls, extra = _VARIANTS[arch]
    config = config_cls(**(_COMMON | {"max_position_embeddings": max_positions}), **extra)
    model = _MODEL_CLASSES[arch](config).to(torch.float32).eval()
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer().save_pretrained(directory)
    return directory


def load_reference(directory: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def snap_to_grid(weight: torch.Tensor) -> torch.Tensor:
    """The nearest Q4_1-style value of every weight (min/max per group of 32)."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - low) / 15
    return (((groups - low) / scale).round() * scale + low).view(out_features, in_features)


def rewritten_copy(source: Path, target: Path, rewrite: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of the checkpoint ``source`` at ``target`` with every tensor replaced by ``rewrite(name, tensor)``."""
    shutil.copytree(source, target)
    (path,) = target.glob("*.safetensors")
    tensors = {name: rewrite(name, tensor) for name, tensor in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return target


def checkpoint_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a one-file safetensors checkpoint, by its HF name (a trainer's state dict)."""
    (path,) = directory.glob("*.safetensors")
    return load_file(path)
