"""Host <-> device copies that never make the host wait for the device.

On CUDA a plain ``torch.tensor(values, device="cuda")`` or ``.tolist()``
synchronises with the whole stream: with a step still running there, the
host would stop until it finishes, and the next step could not be prepared
meanwhile (overlap scheduling, hawker/engine/engine.py). Here uploads go
through pinned host memory with non-blocking copies (torch's pinned-memory
allocator keeps the buffer until its copy has run), and downloads are
queued into pinned buffers with an event that only their own step must
reach. On a CPU both are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def upload(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied without blocking the host."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """Device tensors queued for copying to the host; ``wait()`` returns the host copies."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.event: torch.cuda.Event | None = None
        if not any(t.is_cuda for t in tensors):
            self.host = list(tensors)
            return
        self.host = []
        for tensor in tensors:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            self.host.append(host)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> list[torch.Tensor]:
        """The host copies, once the device has written them (later work on the stream is not waited for)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host
