"""The runner interface: what the engine asks of whatever executes its steps.

Two implementations: ``ModelRunner`` (hawker/engine/model_runner.py), the
model in this process, and ``DriverRunner`` (hawker/engine/driver_runner.py),
rank 0 of a tensor / pipeline parallel world, which sends each step to every
rank. The engine holds a ``Runner`` and never asks which one it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from hawker.step import SchedulerOutput, StepHandle

# Called with the ids of the sampled sequences and their float32 logits.
LogitsObserver = Callable[[list[str], torch.Tensor], None]

# New weights: (Hugging Face name, tensor) pairs, or a directory of safetensors files.
WeightSource = Iterable[tuple[str, Any]] | str | Path


class Runner(Protocol):
    logits_observer: LogitsObserver | None

    @property
    def warming_up(self) -> bool:
        """A compiled step is being built in the background (steps run eager meanwhile)."""
        ...

    def launch(self, step: SchedulerOutput, previous: StepHandle | None = None) -> StepHandle:
        """Start one step. Tokens of ``step`` that are pending were sampled by ``previous`` (still in flight)."""
        ...

    def update_weights(self, weights: WeightSource) -> int:
        """Write new values into the weights in place (all checked first); returns how many tensors changed."""
        ...

    def release_memory(self, weights: bool) -> None:
        """Free the KV cache's memory, and the weights' too with ``weights``."""
        ...

    def restore_memory(self, checkpoint_path: str | None) -> None:
        """Undo ``release_memory``; weights are reloaded from ``checkpoint_path`` when it is given."""
        ...

    def check_health(self) -> None:
        """Raise ``EngineFatalError`` if a part of the runner outside this process has died."""
        ...

    def shutdown(self) -> None:
        """Stop what the runner started (other ranks); nothing in one process."""
        ...
