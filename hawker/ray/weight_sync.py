"""A trainer's weights to its rollout engines over one collective group: one broadcast per tensor, no disk.

The trainer is rank 0 and the engines ranks 1..N of a process group built
on its own TCP store (not ``init_process_group``), so it lives beside any
default group either side already has: the trainer's FSDP group, an
engine's own tensor-parallel world. gloo moves CPU tensors, NCCL device
tensors. Both sides agree on what comes first: the trainer hands each
engine the list of ``WeightSpec`` (through Ray, a small message), then
broadcasts the tensors in that order.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# A receiver waits this long for the trainer's next tensor before failing (it never hangs for good).
SYNC_TIMEOUT = datetime.timedelta(minutes=10)
# Keys of this group in its TCP store, apart from anything else that store might hold.
STORE_PREFIX = "hawker-weight-sync"


@dataclass(frozen=True)
class WeightSpec:
    """What one broadcast carries: the checkpoint (HF) name, dtype and shape of a tensor."""

    name: str
    dtype: str  # torch's name without the "torch." prefix: "float32", "bfloat16"
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> WeightSpec:
        return cls(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}")
        return dtype

    def empty(self, device: str) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.torch_dtype, device=device)


def weight_specs(weights: Iterable[tuple[str, torch.Tensor]]) -> list[WeightSpec]:
    return [WeightSpec.of(name, tensor) for name, tensor in weights]


@dataclass(frozen=True)
class PackedWeights:
    """Tensors as raw bytes in numpy arrays, for Ray's object store: ``ray.put(PackedWeights.of(...))``.

    Ray stores numpy arrays without pickling their data, and an actor reads
    them in place from shared memory; torch tensors are pickled and copied
    on both sides (several times slower for a model's state dict:
    benchmarks/RESULTS.md). Bytes, not numpy's own dtypes, because numpy has
    no bfloat16.
    """

    specs: tuple[WeightSpec, ...]
    buffers: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, weights: Iterable[tuple[str, torch.Tensor]]) -> PackedWeights:
        specs, buffers = [], []
        for name, tensor in weights:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            specs.append(WeightSpec.of(name, tensor))
            buffers.append(flat.view(torch.uint8).numpy())
        return cls(tuple(specs), tuple(buffers))

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors, viewing the buffers in place (read-only: the engine copies them into its weights)."""
        out = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for spec, buffer in zip(self.specs, self.buffers, strict=True):
                if buffer.size == 0:  # numpy gives an empty array no stride that torch can view
                    out.append((spec.name, spec.empty("cpu")))
                    continue
                raw = torch.from_numpy(buffer)
                out.append((spec.name, raw.view(spec.torch_dtype).reshape(spec.shape)))
        return out


class WeightSyncGroup:
    """Rank ``rank`` of a ``world_size`` group meeting at ``host:port`` (rank 0, the trainer, listens).

    Every member constructs one at the same time (construction blocks until
    all have joined). ``device``: where tensors travel, cpu (gloo) or cuda
    (NCCL).
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: str = "cpu") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = device
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=SYNC_TIMEOUT)
        prefixed = dist.PrefixStore(STORE_PREFIX, store)
        self._group: Any
        if torch.device(device).type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = SYNC_TIMEOUT
            self._group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            self._group = dist.ProcessGroupGloo(prefixed, rank, world_size, SYNC_TIMEOUT)
        self._store = store  # the group reads it for as long as it lives

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._group.broadcast([tensor], options).wait()

    def send(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The trainer's side: broadcast each tensor in turn (the order of the specs it sent)."""
        if self.rank != 0:
            raise ValueError("only rank 0 (the trainer) sends weights")
        for _, tensor in weights:
            self._broadcast(tensor.detach().to(self.device).contiguous())

    def receive(self, specs: Iterable[WeightSpec]) -> list[tuple[str, torch.Tensor]]:
        """An engine's side: the tensors of ``specs``, in order, as the trainer broadcasts them."""
        if self.rank == 0:
            raise ValueError("rank 0 (the trainer) sends weights; engines receive them")
        received = []
        for spec in specs:
            tensor = spec.empty(self.device)
            self._broadcast(tensor)
            received.append((spec.name, tensor))
        return received
