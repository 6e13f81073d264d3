"""Weight-sync time: ``LLM.update_weights`` on the default model (issue 8).

    .venv/bin/python benchmarks/weight_sync.py

The tensors are the default model's own (HF names, dequantised from its
GGUF, in a trainer's float32), passed as a trainer's ``state_dict().items()``
would be: all of them, then only layer 0's. The engine runs without int4
copies (``int4_decode_max_rows=0``), which weight updates need; its float32
matmul copies (on by default on this CPU) are refreshed by every update.
Reports the median of several updates.
"""

from __future__ import annotations

import statistics
import time

import torch

from hawker import LLM
from hawker.loader.checkpoint import open_checkpoint

REPEATS = 7


def median_update_ms(llm: LLM, tensors: list[tuple[str, torch.Tensor]]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        llm.update_weights(tensors)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    llm = LLM(dtype="bfloat16", int4_decode_max_rows=0, compile_decode_max_rows=0)
    state = [(name, tensor.float().clone()) for name, tensor in open_checkpoint(None).weights()]
    layer0 = [(name, tensor) for name, tensor in state if name.startswith("model.layers.0.")]
    megabytes = sum(t.numel() * t.element_size() for _, t in state) / 2**20
    print(f"all {len(state)} tensors ({megabytes:.0f} MiB as float32): {median_update_ms(llm, state):.1f} ms")
    layer_mb = sum(t.numel() * t.element_size() for _, t in layer0) / 2**20
    print(f"layer 0: {len(layer0)} tensors ({layer_mb:.1f} MiB): {median_update_ms(llm, layer0):.1f} ms")


if __name__ == "__main__":
    main()
