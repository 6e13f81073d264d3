"""Weight-sync time: ``LLM.update_weights`` on the default model (issue 8), and the same weights sent
to a ``hawker.ray.RolloutEngine`` actor over a weight-sync group or through Ray's object store (issue 22).

    .venv/bin/python benchmarks/weight_sync.py
    .venv/bin/python benchmarks/weight_sync.py --ray     # also the two Ray paths, one engine actor

The tensors are the default model's own (HF names, dequantised from its
GGUF, in a trainer's float32), passed as a trainer's ``state_dict().items()``
would be: all of them, then only layer 0's. The engine runs without int4
copies (``int4_decode_max_rows=0``), which weight updates need; its float32
matmul copies (on by default on this CPU) are refreshed by every update.
Reports the median of several updates.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

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


# The engine's options in every path: the 4/8-bit copies off, as weight updates need.
ENGINE_OPTIONS: dict[str, Any] = {
    "dtype": "bfloat16",
    "int4_decode_max_rows": 0,
    "int8_dot_matmul": False,
    "compile_decode_max_rows": 0,
}


def ray_sync_ms(state: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Median ms of a full sync to one RolloutEngine actor: over a gloo group (one broadcast per tensor),
    and through the object store (one ray.put, of PackedWeights or of a dict of tensors); and of the
    engine's own write, inside the first two."""
    import ray

    from hawker.distributed.launch import free_port
    from hawker.ray import PackedWeights, RolloutEngine, WeightSyncGroup, weight_specs

    ray.init(num_cpus=2)
    engine = ray.remote(RolloutEngine).options(num_cpus=1).remote(None, **ENGINE_OPTIONS)
    port = free_port()
    joined = engine.join_weight_sync.remote("127.0.0.1", port, 1, 2)
    group = WeightSyncGroup("127.0.0.1", port, 0, 2)
    ray.get(joined)
    specs = weight_specs(state)
    times: dict[str, list[float]] = {
        "group": [],
        "object store (PackedWeights)": [],
        "object store (a dict of tensors)": [],
        "engine write": [],
    }
    for _ in range(REPEATS):
        start = time.perf_counter()
        received = engine.receive_weights.remote(specs)
        group.send(state)
        ray.get(received)
        times["group"].append((time.perf_counter() - start) * 1000)
        times["engine write"].append(ray.get(engine.update_seconds.remote()) * 1000)
        start = time.perf_counter()
        ray.get(engine.update_weights.remote(ray.put(PackedWeights.of(state))))
        times["object store (PackedWeights)"].append((time.perf_counter() - start) * 1000)
        times["engine write"].append(ray.get(engine.update_seconds.remote()) * 1000)
        start = time.perf_counter()
        ray.get(engine.update_weights.remote(ray.put(dict(state))))
        times["object store (a dict of tensors)"].append((time.perf_counter() - start) * 1000)
    ray.get(engine.close.remote())
    ray.shutdown()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ray", action="store_true", help="also sync to a RolloutEngine actor on a local Ray")
    args = parser.parse_args()
    llm = LLM(**ENGINE_OPTIONS)
    state = [(name, tensor.float().clone()) for name, tensor in open_checkpoint(None).weights()]
    layer0 = [(name, tensor) for name, tensor in state if name.startswith("model.layers.0.")]
    megabytes = sum(t.numel() * t.element_size() for _, t in state) / 2**20
    print(f"all {len(state)} tensors ({megabytes:.0f} MiB as float32): {median_update_ms(llm, state):.1f} ms")
    layer_mb = sum(t.numel() * t.element_size() for _, t in layer0) / 2**20
    print(f"layer 0: {len(layer0)} tensors ({layer_mb:.1f} MiB): {median_update_ms(llm, layer0):.1f} ms")
    if args.ray:
        llm.close()
        del llm  # the actor's engine takes this one's place in memory
        for name, ms in ray_sync_ms(state).items():
            print(f"all tensors to a RolloutEngine actor, {name}: {ms:.1f} ms")


if __name__ == "__main__":
    main()
