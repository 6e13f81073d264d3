"""A ``torch.compile``'d forward pass for small decode-only steps (CPU).

A decode step of a few sequences is cheap arithmetic wrapped in ~55 aten
calls per decoder layer; on a 2-core CPU their dispatch and the separate
passes over small tensors cost as much as the matmuls (benchmarks/NOTES.md).
Inductor fuses the elementwise work into a few C++ loops and removes the
per-op dispatch. Only decode-only steps with one decode group and at most
``max_rows`` rows take this path: their shapes vary along two dimensions
(rows, context length), both marked dynamic, so a handful of graphs cover
them and are all compiled at start-up. Prefill and mixed steps stay eager:
their matmuls dwarf the dispatch cost and their structure varies a lot.

Compiling takes ~100 s on a 2-core CPU with inductor's on-disk cache cold
(~17 s warm). ``warm_up(background=True)`` (the server's default) compiles
on a thread of its own while every step runs eager; ``handles`` says no
until all the graphs are compiled, then the next eligible step takes the
compiled path. Its dummy steps write only to the last ``scratch_blocks`` of
the cache, which the engine keeps out of the block pool, so they never touch
a live request's keys and values. torch.fx's tracer (AOTAutograd and
inductor's passes run it) replaces ``nn.Module.__call__`` and
``__getattr__`` for the whole process while it traces, so a step's modules,
called from the engine thread, would go through the tracer and fail:
``_scope_fx_patches_to_their_thread`` makes every such replacement apply to
the tracing thread only. A failed compile is logged and leaves the steps eager.
``background=False`` compiles before returning (benchmarks, the offline
API): its first timed step is already the compiled one.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import logging
import os
import shutil
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from hawker.attention.backend import StepAttention
from hawker.attention.metadata import AttentionMetadata, DecodeGroup, PagedDecode
from hawker.models.base import CausalLM

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]
Forward = Callable[[torch.Tensor, torch.Tensor, list[KVCache], StepAttention], torch.Tensor]

# Decode-only steps of up to min(max_num_seqs, this) rows take the compiled path by
# default. Eager dispatch costs 10-30 ms a step at 17-64 rows on a 2-core CPU
# (benchmarks/NOTES.md); the graphs are few: one per copy a plan switches to.
DEFAULT_COMPILE_DECODE_MAX_ROWS = 256
# Graphs compiled at most (each ~10-30 s cold on 2 cores; dynamo's recompile limit is 8).
MAX_GRAPHS = 6
# The warm-up thread's nice value: steps (and the HTTP loop) get the cores first.
_WARM_UP_NICENESS = 10
# Python's GIL switch interval while it compiles. Every torch op of an eager step
# releases the GIL and then waits for the compiling thread (pure Python for most of
# ~100 s) to hand it back, which it does after the interval: at the default 5 ms,
# a decode step of ~1,700 ops took up to seconds.
_WARM_UP_SWITCH_INTERVAL_S = 0.00005


def can_compile_on_cpu() -> bool:
    """Inductor's CPU backend needs a C++ compiler, and the user may have turned dynamo off."""
    compiler = os.environ.get("CXX") or "g++"
    return shutil.which(compiler) is not None and not _dynamo_disabled()


def _dynamo_disabled() -> bool:
    # Importing torch._dynamo takes ~1.5 s; until something has, its switch is the environment's.
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return os.environ.get("TORCH_COMPILE_DISABLE", "0") == "1"
    return bool(dynamo.config.disable)


def scratch_blocks(max_rows: int, block_size: int) -> int:
    """KV blocks at the end of the cache that warm-up steps of up to ``max_rows`` rows write to."""
    return -(-max_rows // block_size)


def decode_only_single_group(meta: AttentionMetadata) -> bool:
    """Decodes only, attended in one call: the in-place kernel, or one padded SDPA group."""
    return not meta.prefills and (meta.paged_decode is not None or len(meta.decode_groups) == 1)


class CompiledDecode:
    """Runs eligible decode steps through the compiled forward once ``warm_up`` has compiled it."""

    def __init__(self, model: CausalLM, max_rows: int, paged_decode: bool = False, cpp_wrapper: bool = True) -> None:
        self.max_rows = max_rows
        self.paged_decode = paged_decode  # steps' decodes use the in-place kernel (PagedDecode metadata)
        self.cpp_wrapper = cpp_wrapper  # inductor's wrapper around the kernel calls in C++, not Python
        self._model = model
        self._forward: Forward | None = None  # built by warm_up: torch.compile imports dynamo (~1.5 s)
        self._ready = threading.Event()  # every warm-up graph is compiled
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why a background warm-up failed (the steps stay eager)
        self.warm_up_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def warming_up(self) -> bool:
        """Compiling in the background: steps run eager until it is done."""
        return self._thread is not None and self._thread.is_alive() and not self._ready.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background warm-up to end; True if the compiled path is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def _compiled(self) -> Forward:
        if self._forward is None:
            self._forward = _compile(self._model, self.cpp_wrapper)
        return self._forward

    def handles(self, input_ids: torch.Tensor, meta: StepAttention) -> bool:
        # The torch backend's decode-only steps: what the graphs were traced on.
        torch_decode = isinstance(meta, AttentionMetadata) and decode_only_single_group(meta)
        return self._ready.is_set() and input_ids.shape[0] <= self.max_rows and torch_decode

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: StepAttention
    ) -> torch.Tensor:
        assert isinstance(meta, AttentionMetadata), "compiled steps are the torch backend's"
        _mark_step_dims_dynamic(input_ids, positions, meta)
        return self._compiled()(input_ids, positions, kv_caches, meta)

    def warm_up(self, kv_caches: list[KVCache], row_counts: Iterable[int], background: bool = False) -> None:
        """Compile the graphs for ``row_counts``: now (an error raises), or on a thread (an error is logged).

        The dummy steps write keys/values to the first slots of the cache's
        last ``scratch_blocks(max_rows, block_size)`` blocks and read only
        those: before any request runs any slot would do; while requests run
        (background) the engine has kept those blocks out of its pool.
        """
        counts = sorted(set(row_counts))
        if background and not _scope_fx_patches_to_their_thread():
            logger.warning("this torch has no torch.fx._symbolic_trace._new_patcher: compiling before serving")
            background = False
        if not background:
            self._compile_steps(kv_caches, counts)
            return
        # torch's compile settings are context variables: the thread sees those of this one.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._compile_in_background, kv_caches, counts),
            name="hawker-compile",
            daemon=True,
        )
        self._thread.start()
        logger.info("compiling decode steps of 1..%d rows in the background; steps run eager until then", self.max_rows)

    def _compile_in_background(self, kv_caches: list[KVCache], counts: list[int]) -> None:
        # Linux gives each thread its own nice value, inherited by the compiler processes it starts.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WARM_UP_NICENESS)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, _WARM_UP_SWITCH_INTERVAL_S))
        try:
            self._compile_steps(kv_caches, counts)
        except Exception as error:
            self.failure = f"{type(error).__name__}: {error}"
            logger.exception("compiling the decode step failed; decode steps stay eager")
        finally:
            sys.setswitchinterval(interval)

    def _compile_steps(self, kv_caches: list[KVCache], counts: list[int]) -> None:
        start = time.perf_counter()
        k_cache = kv_caches[0][0]
        first_block = k_cache.shape[0] - scratch_blocks(self.max_rows, k_cache.shape[1])
        if first_block < 0:
            raise ValueError(f"the KV cache has {k_cache.shape[0]} blocks; warm-up steps need {self.max_rows} slots")
        with torch.inference_mode():
            for rows in counts:
                meta = _dummy_meta(rows, k_cache.device, self.paged_decode, first_block, k_cache.shape[1])
                self(*_dummy_decode_step(rows, k_cache.device), kv_caches, meta)
        self.warm_up_seconds = time.perf_counter() - start
        self._ready.set()
        logger.info("compiled decode steps of 1..%d rows in %.1f s", self.max_rows, self.warm_up_seconds)


def _scope_fx_patches_to_their_thread() -> bool:
    """Make torch.fx's tracing patches (of ``nn.Module`` and of module globals) act in the tracing thread only.

    ``Tracer.trace`` makes them through the ``_Patcher`` that its module's
    ``_new_patcher()`` yields (looked up at each trace); the patcher here
    installs, instead of each replacement, a function that calls it in the
    thread that traces and the original everywhere else. Done once per
    process; False where this torch has no such hook.
    """
    fx_trace = torch.fx._symbolic_trace
    original = getattr(fx_trace, "_new_patcher", None)
    patcher_class = getattr(fx_trace, "_Patcher", None)
    if original is None or patcher_class is None:
        return False
    if getattr(original, "hawker_thread_scoped", False):
        return True

    class ThreadScopedPatcher(patcher_class):  # type: ignore[misc, valid-type]
        def patch(
            self, frame_dict: dict[str, Any], name: str, new_fn: Callable[..., Any], deduplicate: bool = True
        ) -> None:
            if name in frame_dict and getattr(frame_dict[name], "__fx_already_patched", False):
                return
            before = frame_dict[name] if name in frame_dict else getattr(builtins, name, None)
            super().patch(frame_dict, name, _in_this_thread(new_fn, before), deduplicate)

        def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
            if getattr(getattr(cls, name), "__fx_already_patched", False):
                return
            super().patch_method(cls, name, _in_this_thread(new_fn, getattr(cls, name)), deduplicate)

    @contextlib.contextmanager
    def thread_scoped() -> Iterator[Any]:
        with original() as patcher:
            patcher.__class__ = ThreadScopedPatcher  # the same state; only patch and patch_method differ
            yield patcher

    thread_scoped.hawker_thread_scoped = True  # type: ignore[attr-defined]
    fx_trace._new_patcher = thread_scoped
    return True


def _in_this_thread(replacement: Callable[..., Any], original: Callable[..., Any] | None) -> Callable[..., Any]:
    """``replacement`` when called from the current thread, ``original`` from any other."""
    owner = threading.get_ident()

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == owner or original is None:
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    return dispatch


def _compile(model: CausalLM, cpp_wrapper: bool) -> Forward:
    """``model``'s forward through ``torch.compile`` (compiled on its first calls).

    With ``cpp_wrapper`` inductor writes the code around the kernel calls in C++: a one-row step of the
    default model makes ~300 calls (inductor's fused loops, the int8 dot and attention operators), each
    ~3-5 us from Python's wrapper; the price is a C++ build of that wrapper per graph."""
    # Guards on the model's ~400 parameters and attributes cost 1.3 ms a
    # step (measured: 1.5 ms -> 0.2 ms of "TorchDynamo Cache Lookup").
    # Skipping them is safe while the modules and their tensors are never
    # swapped for others (weight updates must copy into them in place), and
    # as long as no other model can hit this graph: see _private_forward.
    return torch.compile(
        _private_forward(model),
        dynamic=None,
        fullgraph=True,
        options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": cpp_wrapper},
    )


def _private_forward(model: CausalLM) -> Forward:
    """``model``'s forward as a function whose code object belongs to this model alone.

    Dynamo keeps compiled graphs on the code object of the function it
    compiles. Every model of the Llama family shares one forward; with the
    module guards skipped, a second model in the process (another size, or
    qk-norm) would run the first one's graph. A fresh copy of the code
    object gives each model its own graph cache.
    """

    def forward(
        input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden: torch.Tensor = model(input_ids, positions, kv_caches, meta)
        return hidden

    code = forward.__code__.replace(co_name=f"forward_of_model_{id(model):x}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)


def rows_within_graph_budget(max_rows: int, branch_rows: Iterable[int], graphs: int = MAX_GRAPHS) -> int:
    """The largest bound <= ``max_rows`` whose warm-up compiles at most ``graphs`` graphs.

    A plan on tiles branches at every multiple of the tile: up to 256 rows on
    tiles of 16 that is 32 graphs, minutes of compiling, and past dynamo's
    recompile limit (8) the compiled step fails. Beyond the bound, steps run eager.
    """
    branches = sorted(set(branch_rows))
    for bound in [max_rows, *(rows - 1 for rows in reversed(branches) if 2 < rows <= max_rows)]:
        if len(warm_up_row_counts(bound, branches)) <= graphs:
            return bound
    return min(max_rows, 2)


def warm_up_row_counts(max_rows: int, branch_rows: Iterable[int]) -> list[int]:
    """Row counts whose steps compile every graph the compiled path can meet.

    One row is a graph of its own (dynamo specialises sizes of 1); 2 and up
    share one until a projection switches weight copy at ``branch_rows``.
    """
    counts = {1, 2, max_rows} | {rows for rows in branch_rows if 2 < rows <= max_rows}
    return sorted(rows for rows in counts if rows <= max_rows)


def _mark_step_dims_dynamic(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
    # Without this the first recompile would come mid-serving (automatic dynamic).
    for tensor in (input_ids, positions, meta.slot_mapping):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    if meta.paged_decode is not None:
        for tensor in (meta.paged_decode.block_tables, meta.paged_decode.context_lens):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(meta.paged_decode.block_tables, 1)
        return
    group = meta.decode_groups[0]
    torch._dynamo.maybe_mark_dynamic(group.slots, 0)
    torch._dynamo.maybe_mark_dynamic(group.slots, 1)
    torch._dynamo.maybe_mark_dynamic(group.mask, 0)
    torch._dynamo.maybe_mark_dynamic(group.mask, 3)


def _dummy_decode_step(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.zeros(rows, dtype=torch.long, device=device)
    positions = torch.ones(rows, dtype=torch.long, device=device)
    return input_ids, positions


def _dummy_meta(
    rows: int, device: torch.device, paged_decode: bool, first_block: int, block_size: int
) -> AttentionMetadata:
    """A decode step of ``rows`` rows at context 2 that writes slots from ``first_block`` on and reads its first two."""
    context = 2  # not 1, which dynamo would specialise
    first_slot = first_block * block_size
    slot_mapping = torch.arange(first_slot, first_slot + rows, device=device)
    if paged_decode:
        tables = torch.full((rows, context), first_block, dtype=torch.long, device=device)
        lens = torch.full((rows,), context, dtype=torch.long, device=device)
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=rows,
            decode_groups=(),
            prefills=(),
            paged_decode=PagedDecode(tables, lens),
        )
    slots = torch.arange(first_slot, first_slot + context, device=device).repeat(rows, 1)
    mask = torch.ones(rows, 1, 1, context, dtype=torch.bool, device=device)
    return AttentionMetadata(
        slot_mapping=slot_mapping,
        num_decodes=rows,
        decode_groups=(DecodeGroup(0, rows, context, slots, mask),),
        prefills=(),
    )
