"""New weight values written into a loaded model in place (a trainer's sync, or a directory of files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hawker.engine.runner import WeightSource
from hawker.layers.projection import ProjectionCopies
from hawker.loader.update_files import open_update
from hawker.models.weights import CheckpointWeights


def write_weights(model: CheckpointWeights, weights: WeightSource) -> int:
    """Check every name, dtype and shape of ``weights``, then write them; returns how many tensors were written.

    A directory's files must lie inside it and have sound headers
    (hawker/loader/update_files.py). Nothing is written unless every tensor
    fits, so a bad update changes nothing. Projections' fast copies of the
    written weights are rebuilt.
    """
    if isinstance(weights, str | Path):
        update = open_update(weights)
        check_updatable(model, model.check_weight_shapes(update.shapes()))
        written = model.load_weights(update.weights(), require_all=False)
    else:
        items = list(weights)
        check_weights(model, items)
        written = model.load_weights(items, require_all=False)
    targets = {id(param) for param in written}
    for module in model.modules():
        if isinstance(module, ProjectionCopies) and id(module.weight) in targets:
            module.refresh_copies()
    return len(written)


def check_weights(model: CheckpointWeights, weights: list[tuple[str, torch.Tensor]] | str | Path) -> None:
    """Raise ValueError, as ``write_weights`` would before writing anything, unless ``weights`` fit
    (ranks of one engine all check before any of them writes)."""
    if isinstance(weights, str | Path):
        check_updatable(model, model.check_weight_shapes(open_update(weights).shapes()))
    else:
        check_updatable(model, model.check_weight_shapes((name, tuple(t.shape)) for name, t in weights))


def check_updatable(model: CheckpointWeights, targets: Sequence[nn.Parameter]) -> None:
    """Refuse to change weights that keep a 4/8-bit copy of the checkpoint's quantised values."""
    ids = {id(param) for param in targets}
    for name, module in model.named_modules():
        if isinstance(module, ProjectionCopies) and module.quantized_copy and id(module.weight) in ids:
            raise ValueError(
                f"{name} keeps a 4/8-bit copy of its quantised checkpoint weight, which new values would "
                "not match; start the engine with int4_decode_max_rows=0, int8_dot_matmul=False and "
                "amx_q4_matmul=False to take "
                "weight updates"
            )
