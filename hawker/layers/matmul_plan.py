"""Which weight copy multiplies a step of n rows: measured on this machine at start-up.

The fastest way to multiply by a projection's weight depends on the CPU (AMX
tiles, AVX512-BF16, neither; its caches and bandwidth) and on the number of
rows of the step, and it differs by several times between machines of the
same kind: one 2-core development box multiplied bfloat16 at 1,519 GFLOP/s
and float32 at 341 (AMX), another at 850 and 200 (AVX512-BF16, no AMX), and
torch's int4 kernel beat bfloat16 up to 24 rows on the first and up to 4 on
the second. Fixed row thresholds tuned on one of them cost 3x on the other
(benchmarks/NOTES.md). So each group of layers of one shape times every
copy it may use (hawker/layers/weight_copies.py) at a ladder of row counts,
weights read from memory as a step reads them (one pass over all the
group's layers for few rows, where reading the weights is the cost), and
takes the fastest per row count; a copy replaces the preferred one only when
clearly faster (``MIN_GAIN``), so timing noise does not flip choices.

Consistent numerics (``MatmulOptions.consistent``): a token's numbers must
not depend on how many rows its step has, or a prompt would decode
differently cold and after a prefix-cache hit. A kernel's rows may depend on
the row count (oneDNN picks its algorithm by it: on the AMX machine rows
1-32 and >= 768 shared one order, 33-512 another; on the AVX512-BF16 one
every row count gave the same bits). So the plan also probes each copy:
row-invariant over a range of row counts, it may serve that whole range
untiled; otherwise only on fixed tiles (every call the same shape, the last
tile zero-padded). A projection then uses one copy for every step of up to
``CONSISTENT_DECODE_ROWS`` rows (decode steps of a few sequences) and one for
every larger step, the model runner padding prefill forwards past that
size. The LM head splits at the same row count: it sees one row per
sequence sampled in the step, so with up to that many sequences running it
always takes its few-row copy, whether a token was sampled after a prefill
(cold or after a prefix-cache hit) or a decode; that is the same reach as
the projections' guarantee (more concurrent sequences change the
projections' copy anyway). Each is the cheapest per row over its range
among the consistent candidates.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hawker.config import MatmulOptions
from hawker.kernels import amx_linear, int8_dot_linear, panel_linear
from hawker.layers.weight_copies import (
    AMX,
    AMXQ4,
    BUILDERS,
    DENSE,
    FP32,
    INT4,
    INT8DOT,
    INT8PAIR,
    PACKED,
    PANEL,
    WeightCopy,
)

logger = logging.getLogger(__name__)

# Row counts timed; a step of n rows takes the choice of the smallest of these >= n. Prompt steps of up to the
# token budget (2,048 by default) are timed too: the 4-bit AMX copy wins at 512 rows and loses 6 % at 2,048
# (benchmarks/NOTES.md, session 20).
ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048)
# Up to this many rows (a decode step's), a step reads every weight from memory: the whole model and the KV
# cache pass through the caches between two uses of a layer. Such rows are timed over all the group's layers
# (float32's: a few) with the last-level cache emptied before each pass; one group's layers alone (33 MB of
# the default model's 960 x 576 projections) stay in a large L3 from pass to pass. Timed warm, the 4-bit AMX
# copy lost at 32-128 rows where it wins from memory by 10-27 % (benchmarks/NOTES.md, session 20).
COLD_ROWS = 256
# Above it, two layers suffice (the product, not the read, is the cost).
WARM_LAYERS = 2
# Consistent numerics: a decode token gets the same numbers in any step of up to this many rows.
CONSISTENT_DECODE_ROWS = 16
# Tile sizes of the tiled (consistent by construction) candidates.
TILES = (16, 32, 64, 128)
# Copies whose products have the same bits (the 4-bit AMX copy dequantises into the bfloat16 one's tiles):
# consistent numerics may switch between them by row count.
SAME_BITS = ((AMX, AMXQ4),)
# Ties and near-ties go to the first of these that the layer has.
PREFERENCE = (PACKED, DENSE, PANEL, AMX, AMXQ4, INT4, INT8PAIR, INT8DOT, FP32)
# Another copy replaces the preferred one only when at least this much faster.
MIN_GAIN = 0.05
# Copies worth timing at few rows only (they lose to the dense forms beyond) and many rows only.
SMALL_ROW_KERNELS = (INT4, INT8PAIR)
SMALL_ROW_LIMIT = 32
LARGE_ROW_KERNELS = (FP32,)
LARGE_ROW_FLOOR = 32
# Any number of rows.
ANY_ROWS = sys.maxsize
# A weight at least this large that a step reads once, after every layer's weights and the KV cache have passed
# through the caches (the LM head: 57 MB for the default model), is timed with the last-level cache emptied
# before each pass: timed warm, its oneDNN copy on 64-row tiles won, though it is 1.4-1.6x slower than the AMX
# copy from memory at 32-128 rows (benchmarks/NOTES.md, session 17).
COLD_WEIGHT_BYTES = 16 * 2**20
# Bytes read to empty the last-level cache where the CPU does not report its size, and at most.
DEFAULT_LAST_LEVEL_CACHE = 64 * 2**20
MAX_LAST_LEVEL_CACHE = 2**30


@dataclass(frozen=True)
class PlanStep:
    max_rows: int  # inputs of up to this many rows (the last step: any number)
    kernel: str
    tile: int = 0  # > 0: multiplied on fixed tiles of this many rows, the last one zero-padded


@dataclass(frozen=True)
class LayerPlan:
    steps: tuple[PlanStep, ...]

    def choose(self, rows: int) -> PlanStep:
        for step in self.steps:
            if rows <= step.max_rows:
                return step
        return self.steps[-1]

    @property
    def kernels(self) -> set[str]:
        return {step.kernel for step in self.steps}

    @property
    def change_rows(self) -> list[int]:
        """Row counts whose step takes another copy than one row fewer (where compiled graphs branch)."""
        return [step.max_rows + 1 for step in self.steps[:-1]]

    def graph_rows(self, max_rows: int) -> list[int]:
        """Row counts up to ``max_rows`` where a compiled graph of the projection meets a new branch.

        Besides the copy changes, a tiled step loops over ``rows // tile`` full
        tiles and pads the rest: each number of full tiles, and whether there is
        a padded rest, is a graph of its own.
        """
        rows = set(self.change_rows)
        first = 1
        for step in self.steps:
            if step.tile:
                first_multiple = -(-first // step.tile) * step.tile
                for multiple in range(first_multiple, min(step.max_rows, max_rows) + 1, step.tile):
                    rows |= {multiple, multiple + 1}
                rows.add(first)
            first = step.max_rows + 1
        return sorted(count for count in rows if count <= max_rows)

    def describe(self) -> str:
        parts, first = [], 1
        for step in self.steps:
            name = f"{step.kernel}/{step.tile}" if step.tile else step.kernel
            last = "" if step.max_rows == ANY_ROWS else str(step.max_rows)
            parts.append(f"{name} [{first}-{last}]" if first != step.max_rows else f"{name} [{first}]")
            first = step.max_rows + 1
        return ", ".join(parts)


def plan_from_choices(choice: Callable[[int], tuple[str, int]], last_rows: int) -> LayerPlan:
    """The plan that takes ``choice(n)`` for n = 1..last_rows and ``choice(last_rows)`` beyond."""
    steps: list[PlanStep] = []
    for rows in range(1, last_rows + 1):
        kernel, tile = choice(rows)
        if steps and (steps[-1].kernel, steps[-1].tile) == (kernel, tile):
            steps[-1] = PlanStep(rows, kernel, tile)
        else:
            steps.append(PlanStep(rows, kernel, tile))
    steps[-1] = PlanStep(ANY_ROWS, steps[-1].kernel, steps[-1].tile)
    return LayerPlan(tuple(steps))


@dataclass(frozen=True)
class Timings:
    """Seconds per product of each copy (kernel) at each timed row count."""

    seconds: dict[str, dict[int, float]]

    def at(self, kernel: str, rows: int) -> float:
        return self.seconds[kernel].get(rows, math.inf)

    def tiled(self, kernel: str, tile: int, rows: int) -> float:
        return math.ceil(rows / tile) * self.at(kernel, tile)


def _time_products(
    copies: Sequence[WeightCopy], x: torch.Tensor, repeats: int, evict: Callable[[], object] | None = None
) -> float:
    """Seconds per product of ``x`` with each of ``copies`` in turn (the best of ``repeats`` passes), ``evict``
    called before each pass."""
    for copy in copies:  # warm-up: oneDNN and MKL build their kernels on the first call of a shape
        copy.matmul(x)
    best = math.inf
    for _ in range(repeats):
        if evict is not None:
            evict()
        start = time.perf_counter()
        for copy in copies:
            copy.matmul(x)
        best = min(best, (time.perf_counter() - start) / len(copies))
    return best


def _row_counts(kernel: str, limit: int) -> list[int]:
    counts = [rows for rows in ROW_COUNTS if rows <= limit]
    if kernel in SMALL_ROW_KERNELS:
        return [rows for rows in counts if rows <= SMALL_ROW_LIMIT]
    if kernel in LARGE_ROW_KERNELS:
        return [rows for rows in counts if rows >= LARGE_ROW_FLOOR]
    return counts


def measure(
    weight: torch.Tensor, copies: dict[str, list[WeightCopy]], limit: int, repeats: int, read_once: bool = False
) -> Timings:
    """Time each kernel's copies (the layers of one group, shaped as ``weight``) at the row counts up to ``limit``;
    ``read_once``: a step reads this weight once, long after its previous step (``COLD_WEIGHT_BYTES``)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(max(ROW_COUNTS), weight.shape[1], generator=generator).to(weight.dtype)
    weight_bytes = weight.numel() * weight.element_size()
    cold = read_once and weight_bytes >= COLD_WEIGHT_BYTES
    layers = max(len(layer_copies) for layer_copies in copies.values())
    # A group small enough for the caches (a test's tiny model) is timed as it lies: flushing costs more.
    flush = torch.ones(_last_level_cache_bytes() // 4) if cold or layers * weight_bytes >= COLD_WEIGHT_BYTES else None
    seconds: dict[str, dict[int, float]] = {}
    for kernel, layer_copies in copies.items():
        seconds[kernel] = {}
        for rows in _row_counts(kernel, limit):
            from_memory = rows <= COLD_ROWS
            used = layer_copies if from_memory else layer_copies[:WARM_LAYERS]
            evict = flush.sum if flush is not None and (cold or from_memory) else None
            seconds[kernel][rows] = _time_products(used, inputs[:rows], repeats, evict)
    return Timings(seconds)


def _last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (sysfs; at most ``MAX_LAST_LEVEL_CACHE``), else
    ``DEFAULT_LAST_LEVEL_CACHE``."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip() if entry.is_file() else ""
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return min(max(sizes, default=DEFAULT_LAST_LEVEL_CACHE), MAX_LAST_LEVEL_CACHE)


def rows_invariant(copy: WeightCopy, x: torch.Tensor, counts: Iterable[int]) -> bool:
    """Every row of a product of the first n rows of ``x`` has the bits of the same row of the largest one."""
    counts = sorted(counts)
    reference = copy.matmul(x[: counts[-1]])
    return all(torch.equal(copy.matmul(x[:rows]), reference[:rows]) for rows in counts)


def probe_counts(first: int, last: int) -> list[int]:
    """Row counts probed for invariance over [first, last]: all the small ones, then ever sparser.

    A kernel's algorithm changes at thresholds of its own; those seen so far lie
    at 32-33 and around 512-768 rows, and the probes straddle such sizes.
    """
    dense = range(first, min(last, 48) + 1)
    sparse = [*range(64, 257, 16), 320, 384, 448, 512, 640, 768, 1024, 1536, 2048, 3072, 4096]
    return sorted({*dense, *(rows for rows in sparse if first <= rows <= last), last})


def _preferred(kernels: Iterable[str]) -> list[str]:
    return sorted(kernels, key=PREFERENCE.index)


def _fastest(candidates: Sequence[tuple[str, int]], cost: Callable[[tuple[str, int]], float]) -> tuple[str, int]:
    """The cheapest candidate, unless the most preferred one is within ``MIN_GAIN`` of it."""
    best = min(candidates, key=cost)
    return candidates[0] if cost(candidates[0]) <= cost(best) * (1 + MIN_GAIN) else best


def speed_plan(timings: Timings, kernels: list[str], options: MatmulOptions, limit: int) -> LayerPlan:
    """Size-tuned plan: the fastest copy at each row count, forced ranges first."""
    forced_int4 = options.int4_max_rows or 0
    forced_fp32 = options.fp32_min_rows or 0
    free = [k for k in kernels if not (k in (INT4, INT8PAIR) and forced_int4) and not (k == FP32 and forced_fp32)]
    timed = [rows for rows in ROW_COUNTS if rows <= limit]

    def choice(rows: int) -> tuple[str, int]:
        if forced_int4 and rows <= forced_int4 and (INT4 in kernels or INT8PAIR in kernels):
            return (INT4 if INT4 in kernels else INT8PAIR), 0
        if forced_fp32 and rows >= forced_fp32 and FP32 in kernels:
            return FP32, 0
        at = next((count for count in timed if count >= rows), timed[-1])
        return _fastest([(k, 0) for k in free], lambda c: timings.at(c[0], at))

    last = max(timed[-1], forced_int4, forced_fp32) + 1
    return plan_from_choices(choice, last)


def _consistent_choice(
    weight: torch.Tensor, timings: Timings, kernels: list[str], first: int, last: int, probe: torch.Tensor
) -> tuple[str, int]:
    """One copy (and tile) for every row count in [first, last]: the cheapest per row of the consistent ones.

    On tiles of a timed size any copy is consistent; untiled, a copy is if its
    rows are invariant over the range, probed on ``weight`` (only for the
    candidates that could be chosen: probing float32 at 2,048 rows is slow).
    """
    counts = [rows for rows in ROW_COUNTS if first <= rows <= last]

    def per_row(candidate: tuple[str, int]) -> float:
        kernel, tile = candidate
        times = [timings.tiled(kernel, tile, n) if tile else timings.at(kernel, n) for n in counts]
        return sum(t / n for t, n in zip(times, counts, strict=True)) / len(counts) if counts else math.inf

    candidates = [(kernel, 0) for kernel in kernels if counts and per_row((kernel, 0)) < math.inf]
    candidates += [(k, tile) for k in kernels for tile in TILES if tile >= first and tile in timings.seconds[k]]
    if not candidates:  # nothing timed over this range: dense on tiles of the smallest size
        return DENSE, TILES[0]
    probed: dict[str, bool] = {}

    def consistent(candidate: tuple[str, int]) -> bool:
        kernel, tile = candidate
        if tile:
            return True
        if kernel not in probed:
            copy = BUILDERS[kernel](weight)
            assert copy is not None
            probed[kernel] = rows_invariant(copy, probe, probe_counts(first, min(last, probe.shape[0])))
        return probed[kernel]

    cheapest = next(c for c in sorted(candidates, key=per_row) if consistent(c))
    untiled = (cheapest[0], 0)
    if cheapest[1] and untiled in candidates and consistent(untiled):
        # Tiles cost compiled graphs (one per tile count): the same copy untiled wins near-ties.
        cheapest = untiled if per_row(untiled) <= per_row(cheapest) * (1 + MIN_GAIN) else cheapest
    preferred = next(c for c in candidates if consistent(c))  # candidates are in order of preference
    return preferred if per_row(preferred) <= per_row(cheapest) * (1 + MIN_GAIN) else cheapest


def consistent_plan(
    weight: torch.Tensor, kernels: list[str], timings: Timings, options: MatmulOptions, limit: int
) -> LayerPlan:
    """Consistent numerics' plan (module docstring): one copy up to ``CONSISTENT_DECODE_ROWS`` rows, one beyond,
    for the LM head as for every projection."""
    generator = torch.Generator().manual_seed(1)
    probe = torch.randn(limit, weight.shape[1], generator=generator).to(weight.dtype)
    forced_int4 = bool(options.int4_max_rows) and INT4 in kernels
    small_kernels = [INT4] if forced_int4 else kernels
    large_kernels = [FP32] if options.fp32_min_rows and FP32 in kernels else kernels
    small = _consistent_choice(weight, timings, small_kernels, 1, CONSISTENT_DECODE_ROWS, probe)
    large = _consistent_choice(weight, timings, large_kernels, CONSISTENT_DECODE_ROWS + 1, limit, probe)
    steps = [
        *_same_bits_by_speed(small, timings, small_kernels, 1, CONSISTENT_DECODE_ROWS),
        *_same_bits_by_speed(large, timings, large_kernels, CONSISTENT_DECODE_ROWS + 1, ANY_ROWS),
    ]
    merged: list[PlanStep] = []
    for step in steps:
        if merged and (merged[-1].kernel, merged[-1].tile) == (step.kernel, step.tile):
            merged[-1] = step
        else:
            merged.append(step)
    return LayerPlan(tuple(merged))


def _same_bits_by_speed(
    choice: tuple[str, int], timings: Timings, kernels: list[str], first: int, last: int
) -> list[PlanStep]:
    """Steps covering rows [first, last] with ``choice``, or, for an untiled copy with a twin of the same bits
    (``SAME_BITS``), with whichever of the two is the faster at each timed row count: the products do not
    change, so consistent numerics may switch between them."""
    kernel, tile = choice
    twins = next((group for group in SAME_BITS if kernel in group), ()) if not tile else ()
    others = [k for k in _preferred(twins) if k != kernel and k in kernels and k in timings.seconds]
    # A step of n rows takes the choice at the smallest timed count >= n; rows past the last count, the last's.
    counts = [rows for rows in ROW_COUNTS if first <= rows <= last and rows in timings.seconds.get(kernel, {})]
    steps: list[PlanStep] = []
    for rows in counts:

        def cost(candidate: tuple[str, int], rows: int = rows) -> float:
            return timings.at(candidate[0], rows)

        fastest, _ = _fastest([choice, *((k, 0) for k in others)], cost)
        if steps and steps[-1].kernel == fastest:
            steps[-1] = PlanStep(rows, fastest, tile)
        else:
            steps.append(PlanStep(rows, fastest, tile))
    if not steps:
        return [PlanStep(last, kernel, tile)]
    steps[-1] = PlanStep(last, steps[-1].kernel, tile)
    return steps


def allowed_kernels(dtype: torch.dtype, options: MatmulOptions) -> list[str]:
    """The copies the options allow for weights of ``dtype`` (before asking each weight whether it has them)."""
    kernels = [DENSE]
    if options.packed is not False:
        kernels.append(PACKED)
    if options.panel is not False and dtype == torch.bfloat16 and panel_linear.available():
        kernels.append(PANEL)
    if options.amx is not False and dtype == torch.bfloat16 and amx_linear.available():
        kernels.append(AMX)
        if options.amx_q4 is not False:
            kernels.append(AMXQ4)
    if options.int4_max_rows != 0 and (dtype != torch.float32 or options.int4_max_rows):
        # torch's int4 kernel is 30-50x slower with float32 activations: only when asked for.
        kernels += [INT4, INT8PAIR]
    if options.int8_dot is not False and int8_dot_linear.supports(dtype, explicit=bool(options.int8_dot)):
        kernels.append(INT8DOT)
    if options.fp32_min_rows != 0 and dtype in (torch.bfloat16, torch.float16):
        kernels.append(FP32)
    return _preferred(kernels)
