"""Engine options (hawker/options.py) resolved into an ``EngineConfig``, checked against the device.

Every "auto" / None default becomes a concrete value here, and options that
cannot work together (a CPU path on a GPU, a kernel that does not build) are
refused with a message naming the option.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from hawker.attention import resolve_attention_backend
from hawker.config import (
    CacheConfig,
    EngineConfig,
    MatmulOptions,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    resolve_dtype,
)
from hawker.engine.compiled_decode import DEFAULT_COMPILE_DECODE_MAX_ROWS, can_compile_on_cpu
from hawker.kernels import (
    amx_linear,
    cpu_decode_attention,
    cpu_prefill_attention,
    int8_dot_linear,
    packed_linear,
    panel_linear,
)
from hawker.loader.checkpoint import Checkpoint, open_checkpoint
from hawker.options import EngineOptions

CPU_KV_CACHE_ENV = "HAWKER_CPU_KV_CACHE_GB"


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {name!r}") from error
    return name


def _cpu_rows_option(name: str, rows: int | None, auto: int, device: str) -> int:
    """Resolve a CPU-only row-threshold option: None = ``auto`` on a CPU (0 elsewhere), 0 = off."""
    on_cpu = torch.device(device).type == "cpu"
    if rows is None:
        return auto if on_cpu else 0
    if rows < 0:
        raise ValueError(f"{name} must be >= 0 (0 = off), got {rows}")
    if rows and not on_cpu:
        raise ValueError(f"{name} is a CPU path; it must be 0 on device {device!r}")
    return rows


def _matmul_options(options: EngineOptions, dtype: torch.dtype, consistent: bool) -> MatmulOptions | None:
    """What the projections' measured plans may use; None (plain ``F.linear``) off a CPU or in batch-invariant mode."""
    on_cpu = torch.device(options.device).type == "cpu"
    explicit = {
        "int4_decode_max_rows": options.int4_decode_max_rows,
        "fp32_matmul_min_rows": options.fp32_matmul_min_rows,
    }
    for name, rows in explicit.items():
        if rows is not None and rows < 0:
            raise ValueError(f"{name} must be >= 0 (0 = off), got {rows}")
        if rows and not on_cpu:
            raise ValueError(f"{name} is a CPU path; it must be 0 on device {options.device!r}")
    if options.packed_matmul and not on_cpu:
        raise ValueError(f"packed_matmul is a CPU path; it must be off on device {options.device!r}")
    if options.packed_matmul and not packed_linear.available(dtype):
        raise ValueError(f"packed_matmul: oneDNN cannot prepack {dtype} weights on this CPU")
    if options.panel_matmul and not on_cpu:
        raise ValueError(f"panel_matmul is a CPU path; it must be off on device {options.device!r}")
    if options.panel_matmul and not (dtype == torch.bfloat16 and panel_linear.available()):
        raise ValueError("panel_matmul needs bfloat16 weights and a CPU with AVX512-BF16 (and a C compiler)")
    if options.amx_matmul and not on_cpu:
        raise ValueError(f"amx_matmul is a CPU path; it must be off on device {options.device!r}")
    if options.amx_matmul and not (dtype == torch.bfloat16 and amx_linear.available()):
        raise ValueError("amx_matmul needs bfloat16 weights and a CPU with AMX (and a C compiler)")
    if options.amx_q4_matmul and (options.amx_matmul is False or not on_cpu):
        raise ValueError("amx_q4_matmul runs on the AMX kernel: it needs a CPU and amx_matmul not off")
    if options.amx_q4_matmul and not (dtype == torch.bfloat16 and amx_linear.available()):
        raise ValueError("amx_q4_matmul needs bfloat16 weights and a CPU with AMX (and a C compiler)")
    if options.int8_dot_matmul and not on_cpu:
        raise ValueError(f"int8_dot_matmul is a CPU path; it must be off on device {options.device!r}")
    if options.int8_dot_matmul and not int8_dot_linear.supports(dtype, explicit=True):
        raise ValueError(
            "int8_dot_matmul needs bfloat16 or float32 weights and a CPU with AVX512-VNNI (and a C compiler)"
        )
    if not on_cpu or options.deterministic:
        return None
    return MatmulOptions(
        int4_max_rows=options.int4_decode_max_rows,
        fp32_min_rows=options.fp32_matmul_min_rows,
        packed=options.packed_matmul,
        panel=options.panel_matmul,
        amx=options.amx_matmul,
        amx_q4=options.amx_q4_matmul,
        int8_dot=options.int8_dot_matmul,
        consistent=consistent,
        max_rows=options.max_num_batched_tokens,
        sample_rows=options.max_num_seqs,
        cache=options.matmul_plan_cache,
    )


def _compile_decode_max_rows(options: EngineOptions, attention_backend: str) -> int:
    # The compiled step is the torch backend's (Triton kernels are not traced),
    # in one process (collectives are not traced either).
    usable = attention_backend == "torch" and options.world_size == 1
    auto = min(options.max_num_seqs, DEFAULT_COMPILE_DECODE_MAX_ROWS) if can_compile_on_cpu() and usable else 0
    rows = _cpu_rows_option("compile_decode_max_rows", options.compile_decode_max_rows, auto, options.device)
    if rows and not usable:
        raise ValueError(
            "compile_decode_max_rows applies to the torch attention backend in one process only; set it to 0"
        )
    return rows


def _attention_backend(options: EngineOptions) -> str:
    backend = resolve_attention_backend(options.attention_backend, options.device)
    # The kernels' tl.dot takes key tiles of >= 16 rows, one cache block at a time.
    if backend == "triton" and (options.block_size < 16 or options.block_size & (options.block_size - 1)):
        raise ValueError(
            f"the triton attention backend needs a power-of-two block_size >= 16, got {options.block_size}"
        )
    return backend


DEFAULT_CPU_KV_CACHE_GB = 2.0
DEFAULT_CUDA_GRAPH_MAX_BATCH_SIZE = 256


def _kv_cache_memory_bytes(options: EngineOptions) -> int | None:
    """The KV pool's budget; None = size it from free memory (the default on a GPU)."""
    if options.kv_cache_memory_gb is not None:
        return int(options.kv_cache_memory_gb * 1024**3)
    if torch.device(options.device).type == "cuda":
        return None
    return int(cpu_kv_cache_gb() * 1024**3)


def cpu_kv_cache_gb() -> float:
    """The CPU pool's default budget: ``HAWKER_CPU_KV_CACHE_GB`` if set (as vLLM's CPU engine takes
    ``VLLM_CPU_KVCACHE_SPACE``: one setting for every engine a process or its children build), else 2 GB.
    The pool is zeroed, so written, when the engine is built: this much memory is taken at once."""
    value = os.environ.get(CPU_KV_CACHE_ENV)
    if value is None:
        return DEFAULT_CPU_KV_CACHE_GB
    try:
        gigabytes = float(value)
    except ValueError:
        raise ValueError(f"{CPU_KV_CACHE_ENV} must be a number of gigabytes, got {value!r}") from None
    if not gigabytes > 0:
        raise ValueError(f"{CPU_KV_CACHE_ENV} must be > 0, got {value!r}")
    return gigabytes


def _cuda_graph_max_batch_size(options: EngineOptions, attention_backend: str) -> int:
    # Graphs replay the triton backend's kernels; the torch backend's decode
    # groups change shape with the context lengths, so they cannot be captured.
    usable = torch.device(options.device).type == "cuda" and attention_backend == "triton" and options.world_size == 1
    rows = options.cuda_graph_max_batch_size
    if rows is None:
        return min(options.max_num_seqs, DEFAULT_CUDA_GRAPH_MAX_BATCH_SIZE) if usable else 0
    if rows < 0:
        raise ValueError(f"cuda_graph_max_batch_size must be >= 0 (0 = off), got {rows}")
    if rows and not usable:
        raise ValueError(
            "cuda_graph_max_batch_size needs a CUDA device, the triton attention backend and one process; set it to 0"
        )
    return rows


def _kv_cache_dtype(options: EngineOptions, attention_backend: str) -> str:
    # The triton kernels read the cache as the queries' dtype; 8-bit floats are the torch backend's.
    if options.kv_cache_dtype != "auto" and attention_backend != "torch":
        raise ValueError(
            f"kv_cache_dtype={options.kv_cache_dtype!r} needs the torch attention backend "
            f"(attention_backend='torch'); the {attention_backend} one reads only the model's dtype"
        )
    return options.kv_cache_dtype


def _consistent_numerics(options: EngineOptions, attention_backend: str) -> bool:
    """Consistent numerics (on by default where covered); batch-invariant mode has its own, stricter tiling."""
    covered = attention_backend == "torch" and not options.deterministic
    wanted = options.consistent_numerics
    if wanted and not covered:
        raise ValueError("consistent_numerics needs the torch attention backend and deterministic off")
    return covered and wanted is not False


def _native_attention(
    wanted: bool | None, kind: str, options: EngineOptions, attention_backend: str, model: ModelConfig
) -> bool:
    """Whether the ``kind`` ("decode" or "prefill") C attention kernel runs: None = wherever it builds."""
    if wanted is False:
        return False
    usable = torch.device(options.device).type == "cpu" and attention_backend == "torch"
    if wanted and not usable:
        raise ValueError(f"native_{kind}_attention is a CPU kernel of the torch attention backend; set it off")
    if kind == "decode":
        group = model.num_heads // model.num_kv_heads
        built = usable and cpu_decode_attention.available(model.dtype, group, model.head_dim)
    else:
        built = usable and cpu_prefill_attention.available(model.dtype)
    if wanted and not built:
        raise ValueError(f"the native {kind} attention kernel could not be built here for {model.dtype} (see the log)")
    return built


def _overlap_scheduling(options: EngineOptions) -> bool:
    if options.overlap_scheduling is None:
        return torch.device(options.device).type == "cuda" and options.world_size == 1
    return options.overlap_scheduling


def world_shape(options: EngineOptions) -> dict[str, int]:
    """The grid fields of a WorldSpec."""
    return {
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "tp_overlap_chunks": options.tp_overlap_chunks,
    }


# Options whose fast paths pick kernels by batch shape, off in batch-invariant mode.
_SHAPE_DEPENDENT_OPTIONS = (
    "int4_decode_max_rows",
    "fp32_matmul_min_rows",
    "packed_matmul",
    "panel_matmul",
    "amx_matmul",
    "amx_q4_matmul",
    "int8_dot_matmul",
    "compile_decode_max_rows",
    "cuda_graph_max_batch_size",
)


def _batch_invariant_options(options: EngineOptions) -> EngineOptions:
    """``options`` with every shape-dependent fast path off; refuses ones the user turned on explicitly."""
    for name in _SHAPE_DEPENDENT_OPTIONS:
        if getattr(options, name):
            raise ValueError(f"deterministic=True needs {name} off (0); it chooses kernels by batch size")
    if options.attention_backend == "triton":
        raise ValueError("deterministic=True runs the torch attention backend (the triton one is not batch-invariant)")
    off: dict[str, Any] = dict.fromkeys(_SHAPE_DEPENDENT_OPTIONS, 0)
    return dataclasses.replace(options, attention_backend="torch", **off)


def engine_config(options: EngineOptions, parallel: ParallelConfig) -> tuple[EngineConfig, Checkpoint]:
    """The config every rank builds from the same options (``options.device`` already resolved)."""
    if options.deterministic:
        options = _batch_invariant_options(options)
    checkpoint = open_checkpoint(options.model)
    device = torch.device(options.device)
    model_config = ModelConfig.from_hf(checkpoint.hf_config, resolve_dtype(options.dtype, device))
    attention_backend = _attention_backend(options)
    consistent = _consistent_numerics(options, attention_backend)
    config = EngineConfig(
        model_path=str(checkpoint.path),
        model=model_config,
        cache=CacheConfig(
            block_size=options.block_size,
            kv_cache_memory_bytes=_kv_cache_memory_bytes(options),
            num_blocks=options.num_kv_blocks,
            enable_prefix_caching=options.enable_prefix_caching,
            gpu_memory_utilization=options.gpu_memory_utilization,
            kv_cache_dtype=_kv_cache_dtype(options, attention_backend),
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=options.max_num_batched_tokens,
            max_num_seqs=options.max_num_seqs,
            max_model_len=_max_model_len(options.max_model_len, model_config),
        ),
        parallel=parallel,
        device=options.device,
        seed=options.seed,
        matmul=_matmul_options(options, model_config.dtype, consistent),
        compile_decode_max_rows=_compile_decode_max_rows(options, attention_backend),
        attention_backend=attention_backend,
        cuda_graph_max_batch_size=_cuda_graph_max_batch_size(options, attention_backend),
        batch_invariant=options.deterministic,
        overlap_scheduling=_overlap_scheduling(options),
        consistent_numerics=consistent,
        grammar_compile_timeout_s=options.grammar_compile_timeout,
        reasoning_parser=options.reasoning_parser,
        compile_warmup=options.compile_warmup,
        compile_cpp_wrapper=options.compile_cpp_wrapper,
        native_decode_attention=_native_attention(
            options.native_decode_attention, "decode", options, attention_backend, model_config
        ),
        native_prefill_attention=_native_attention(
            options.native_prefill_attention, "prefill", options, attention_backend, model_config
        ),
        options=options,
    )
    return config, checkpoint


def _max_model_len(requested: int | None, model: ModelConfig) -> int:
    limit = model.max_position_embeddings
    if model.sliding_window is not None:
        # Sliding-window attention is not implemented: stay inside the window,
        # where full attention is exactly what the model computes.
        limit = min(limit, model.sliding_window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit of {limit} positions")
    return requested
