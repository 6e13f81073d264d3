"""A projection's matmul through the weight copy its measured plan picks for the step's row count.

Every projection keeps its weight in the model dtype; ``plan_projections``
(after loading, on a CPU) times the copies each layer may use
(hawker/layers/weight_copies.py), gives each layer a ``LayerPlan``
(hawker/layers/matmul_plan.py) and keeps only the copies that plan uses.
Without a plan (a GPU, batch-invariant mode) a projection is ``F.linear``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hawker.config import MatmulOptions
from hawker.kernels import amx_linear, rowwise
from hawker.layers import plan_cache
from hawker.layers.matmul_plan import (
    CONSISTENT_DECODE_ROWS,
    WARM_LAYERS,
    LayerPlan,
    allowed_kernels,
    consistent_plan,
    measure,
    speed_plan,
)
from hawker.layers.quant import WeightGrids
from hawker.layers.weight_copies import (
    AMXQ4,
    BUILDERS,
    FP32,
    INT4,
    INT8DOT,
    INT8PAIR,
    RECIPES,
    AmxQ4Weight,
    AmxWeight,
    DenseWeight,
    Recipe,
    WeightCopy,
)
from hawker.switches import switch_on

logger = logging.getLogger(__name__)


FUSED_SWIGLU_VARIABLE = "HAWKER_FUSED_SWIGLU"


def fused_swiglu_on() -> bool:
    """``HAWKER_FUSED_SWIGLU``: 1 (the default) or 0; another value is a ValueError."""
    return switch_on(FUSED_SWIGLU_VARIABLE)


class ProjectionCopies:
    """Mixin for a layer with a 2-D ``weight``: the copies its plan uses and the matmul that picks one."""

    weight: torch.Tensor
    plan: LayerPlan | None = None
    copies: dict[str, WeightCopy]

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T (+ bias)`` through the copy the plan picks for the rows of ``x``."""
        if self.plan is None or x.dim() != 2:
            return F.linear(x, self.weight, bias)
        step = self.plan.choose(x.shape[0])
        copy = self.copies[step.kernel]
        out = _tiled(copy, x, step.tile) if step.tile else copy.matmul(x)
        return out if bias is None else out + bias

    def project_silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of this fused [gate | up] projection (no bias) in one pass, where the plan
        multiplies these rows on AMX tiles untiled and the fused kernel takes them (the same bits as the
        projection followed by hawker/layers/activation.py's ``silu_and_mul``, without the [rows, 2 x size]
        product going to memory: hawker/kernels/amx_linear.py); None elsewhere, or with
        ``HAWKER_FUSED_SWIGLU=0`` (the off switch)."""
        if torch.compiler.is_compiling() or self.plan is None or x.dim() != 2:
            return None  # a compiled step fuses its own, without the plan's branches traced twice
        if not fused_swiglu_on() or not rowwise.switched_on():
            return None
        step = self.plan.choose(x.shape[0])
        copy = self.copies.get(step.kernel)
        if step.tile or not isinstance(copy, AmxWeight | AmxQ4Weight):
            return None
        if not amx_linear.fuses_silu_mul(x, copy.out_features):
            return None
        if isinstance(copy, AmxQ4Weight):
            return amx_linear.q4_silu_mul(x, copy.packed, copy.out_features)
        return amx_linear.silu_mul(x, copy.panel, copy.out_features)

    def set_plan(self, plan: LayerPlan, built: dict[str, WeightCopy]) -> None:
        """Use ``plan``, with the copies it needs (taken from ``built`` where there, else made now)."""
        weight = self.weight.data
        copies: dict[str, WeightCopy] = {}
        for kernel in plan.kernels:
            copy = built.get(kernel) or BUILDERS[kernel](weight)
            if copy is None:
                raise ValueError(f"{type(self).__name__} has no {kernel} form of its weight")
            copies[kernel] = copy
        self.copies = copies
        self.plan = plan

    def refresh_copies(self) -> None:
        """After the weight changed in place: rewrite every copy (compiled graphs hold their tensors)."""
        for copy in (self.copies if self.plan is not None else {}).values():
            copy.refresh(self.weight.data)

    def rebuild_copies(self) -> None:
        """After the weight's memory was given back and restored: make every copy anew."""
        if self.plan is not None:
            self.set_plan(self.plan, {})

    def release_copies(self) -> None:
        """Give the copies' memory back (sleep); ``rebuild_copies`` makes them again."""
        if self.plan is not None:
            self.copies = {kernel: copy for kernel, copy in self.copies.items() if isinstance(copy, DenseWeight)}

    def graph_rows(self, max_rows: int) -> list[int]:
        """Row counts up to ``max_rows`` where a compiled graph branches (``LayerPlan.graph_rows``)."""
        return self.plan.graph_rows(max_rows) if self.plan is not None else []

    @property
    def quantized_copy(self) -> bool:
        """It multiplies through a 4/8-bit copy, which new weight values could not be written into."""
        return self.plan is not None and bool(self.plan.kernels & {INT4, INT8PAIR, INT8DOT, AMXQ4})


def _tiled(copy: WeightCopy, x: torch.Tensor, tile: int) -> torch.Tensor:
    """``copy.matmul`` on fixed tiles of ``tile`` rows (the last one zero-padded): every call has one shape."""
    rows = x.shape[0]
    if rows == tile:
        return copy.matmul(x)
    full = rows // tile * tile
    out = x.new_empty((rows, copy.matmul(x[:0]).shape[1]))
    for first in range(0, full, tile):
        if isinstance(copy, DenseWeight):  # written in place: no temporary, same bits
            copy.matmul_into(x[first : first + tile], out[first : first + tile])
        else:
            out[first : first + tile] = copy.matmul(x[first : first + tile])
    if full < rows:
        padded = x.new_zeros((tile, x.shape[1]))
        padded[: rows - full] = x[full:]
        out[full:] = copy.matmul(padded)[: rows - full]
    return out


@dataclass
class _Group:
    """Projections of one shape and dtype with the same copies available; whether it is the LM head."""

    is_head: bool
    layers: list[ProjectionCopies]
    kernels: list[str]
    recipes: list[dict[str, Recipe]]  # per layer, how to make each copy it has
    built: list[dict[str, WeightCopy]]  # per layer, the copies made so far (for timing)

    def copy(self, layer: int, kernel: str) -> WeightCopy:
        """Layer ``layer``'s ``kernel`` copy, made now unless made before."""
        built = self.built[layer]
        if kernel not in built:
            built[kernel] = self.recipes[layer][kernel]()
        return built[kernel]


def _available(weight: torch.Tensor, kernels: list[str]) -> dict[str, Recipe]:
    """The forms among ``kernels`` that ``weight`` has, each with how to make its copy (made only where a
    plan uses it or it is timed: at start-up most are not)."""
    grids = WeightGrids(weight)  # found once, shared by every form below
    found: dict[str, Recipe] = {}
    for kernel in kernels:
        if kernel == INT8PAIR and INT4 in found:
            continue  # a 4-bit weight is not taken as 8-bit too
        recipe = RECIPES[kernel](weight, grids)
        if recipe is not None:
            found[kernel] = recipe
    return found


def _groups(model: nn.Module, options: MatmulOptions) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    for module in model.modules():
        if not isinstance(module, ProjectionCopies) or module.weight.device.type != "cpu":
            continue
        weight = module.weight.data
        is_head = hasattr(module, "logits")
        kernels = allowed_kernels(weight.dtype, options)
        found = _available(weight, kernels)
        key = (is_head, tuple(weight.shape), weight.dtype, tuple(found))
        group = groups.setdefault(key, _Group(is_head, [], list(found), [], []))
        group.layers.append(module)
        group.recipes.append(found)
        group.built.append({})
    return list(groups.values())


def _timed_copies(group: _Group) -> dict[str, list[WeightCopy]]:
    """Per kernel, the copies to time: every layer's (few rows are timed over all of them), fp32's of a few."""
    timed: dict[str, list[WeightCopy]] = {}
    for kernel in group.kernels:
        count = len(group.layers) if kernel != FP32 else min(WARM_LAYERS, len(group.layers))
        timed[kernel] = [group.copy(layer, kernel) for layer in range(count)]
    return timed


def _measured_plan(group: _Group, options: MatmulOptions, limit: int) -> LayerPlan:
    weight = group.layers[0].weight.data
    timings = measure(weight, _timed_copies(group), limit, options.repeats, read_once=group.is_head)
    if options.consistent:
        return consistent_plan(weight, group.kernels, timings, options, limit)
    return speed_plan(timings, group.kernels, options, limit)


def _cached_or_measured_plan(group: _Group, options: MatmulOptions, limit: int) -> LayerPlan:
    """The group's plan as measured before on this machine and software (hawker/layers/plan_cache.py), else now."""
    if options.cache == "off":
        return _measured_plan(group, options, limit)
    key = plan_cache.plan_key(group.is_head, group.layers[0].weight.data, group.kernels, options, limit)
    plan = plan_cache.load(key) if options.cache == "reuse" else None
    if plan is None or not plan.kernels <= set(group.kernels):
        plan = _measured_plan(group, options, limit)
        plan_cache.store(key, plan)
    return plan


def plan_projections(model: nn.Module, options: MatmulOptions) -> dict[str, str]:
    """Measure and set every CPU projection's plan; returns a description of each group's plan (for the log)."""
    described: dict[str, str] = {}
    float32_won = False
    for group in _groups(model, options):  # in module order: the LM head last
        limit = options.sample_rows if group.is_head else options.max_rows
        weight = group.layers[0].weight.data
        if group.is_head and not float32_won and options.fp32_min_rows is None:
            # The LM head's float32 copy is large to make and time (113 MB for the default model); where it
            # lost to the half-precision copies at every projection's shape it would lose here too.
            group.kernels = [k for k in group.kernels if k != FP32]
        plan = _cached_or_measured_plan(group, options, limit)
        for index, layer in enumerate(group.layers):
            layer.set_plan(plan, {kernel: group.copy(index, kernel) for kernel in plan.kernels})
        group.recipes.clear()  # they hold the weights' grids
        group.built.clear()
        float32_won = float32_won or FP32 in plan.kernels
        name = "lm_head" if group.is_head else "x".join(map(str, weight.shape))
        described[f"{name} ({len(group.layers)} layers)"] = plan.describe()
    for name, text in described.items():
        logger.info("matmul plan %s: %s", name, text)
    return described


def consistent_prefill_rows(rows: int) -> int:
    """Rows a prefill forward is padded to under consistent numerics: past the decode-sized plans' range."""
    return max(rows, CONSISTENT_DECODE_ROWS + 1)
