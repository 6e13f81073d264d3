"""Engine: add_request / step / abort over scheduler + model runner.

One step is schedule -> execute -> update. A user request with ``n > 1``
is a group of ``n`` sequences; siblings reuse the first one's prompt blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

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
from hawker.engine.compiled_decode import (
    DEFAULT_COMPILE_DECODE_MAX_ROWS,
    WARM_UP_MODES,
    can_compile_on_cpu,
    scratch_blocks,
)
from hawker.engine.detokenizer import IncrementalDetokenizer
from hawker.engine.errors import EngineFatalError
from hawker.engine.kv_cache import KVCacheManager
from hawker.engine.memory_profile import profile_num_blocks
from hawker.engine.model_runner import LaunchedStep, ModelOutput, ModelRunner, SeqResult, build_model
from hawker.engine.request import Request, RequestStatus
from hawker.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from hawker.kernels import (
    cpu_decode_attention,
    cpu_prefill_attention,
    int8_dot_linear,
    packed_linear,
    panel_linear,
)
from hawker.layers.projection import ProjectionCopies
from hawker.loader.checkpoint import Checkpoint, open_checkpoint
from hawker.loader.tokenizer import load_tokenizer
from hawker.loader.update_files import open_update
from hawker.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from hawker.sampling_params import SamplingParams

if TYPE_CHECKING:
    from hawker.distributed.executor import DriverRunner
    from hawker.distributed.launch import WorkerProcesses
    from hawker.distributed.world import World, WorldSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """User-facing engine options (the offline API and CLI flags map onto these)."""

    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    # None = 2 GiB on a CPU; on a GPU, what gpu_memory_utilization leaves
    # after the weights and a worst-case step (measured at start-up).
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    # What the KV cache holds: "auto" (the model's dtype) or an 8-bit float,
    # "fp8" / "fp8_e4m3" or "fp8_e5m2" (half the bytes; keys and values
    # rounded to 8 bits). The torch attention backend only.
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    seed: int = 0
    # "auto" = cuda when a GPU is visible, else cpu; or any torch device string.
    device: str = "auto"
    # Steps with at most this many rows use int4 copies of the layers that
    # are 4-bit in the checkpoint (a quarter of the bytes to read; 8-bit ones
    # as two int4 halves); 0 = off, None = wherever the plan measured at
    # start-up finds them faster (bfloat16 / float16 models). CPU only.
    int4_decode_max_rows: int | None = None
    # Steps with at least this many rows multiply half-precision weights
    # through float32 copies; 0 = off, None = wherever the measured plan finds
    # that faster (CPUs with neither AVX512-BF16 nor AMX). CPU only.
    fp32_matmul_min_rows: int | None = None
    # oneDNN-prepacked weights (no reorder per call: several times faster for
    # few rows); None = wherever the measured plan finds them faster, False =
    # off. CPU only.
    packed_matmul: bool | None = None
    # bfloat16 weights in panels of 32 outputs for a C kernel with float32 sums
    # (hawker/kernels/panel_linear.py: half the bytes of a float32 copy where
    # oneDNN's bfloat16 matmul is slow); None = wherever the measured plan
    # finds it faster on a CPU with AVX512-BF16, False = off. CPU only.
    panel_matmul: bool | None = None
    # Weights that are 4/8-bit in the checkpoint (GGUF Q4_1, Q8_0) multiplied
    # by 8-bit integer dot products with activations quantised to 8 bits per
    # group of 32, as llama.cpp does (hawker/kernels/int8_dot_linear.py: a
    # quarter of bfloat16's bytes and 4x the products per instruction);
    # None = wherever the measured plan finds it faster (half-precision
    # models, CPUs with AVX512-VNNI), True = float32 models too, False = off.
    # CPU only.
    int8_dot_matmul: bool | None = None
    # The matmul plan measured before on this machine and software
    # (hawker/layers/plan_cache.py; ``hawker prepare`` measures it at install
    # time): "reuse" it where there is one, "refresh" (measure and keep), or
    # "off" (measure at every start, keep nothing). CPU only.
    matmul_plan_cache: str = "reuse"
    # Decode-only steps of at most this many rows run a torch.compile'd
    # forward (compiled at start-up); 0 = off, None = on (16 rows) on a CPU
    # with a C++ compiler unless TORCH_COMPILE_DISABLE=1. CPU only.
    compile_decode_max_rows: int | None = None
    # How that step is compiled: "blocking" = before the engine is ready (the
    # offline API, benchmarks); "background" = on a thread while steps run
    # eager, switching once every graph is compiled (``hawker serve``'s default).
    compile_warmup: str = "blocking"
    # That step's wrapper in C++ (inductor's ``cpp_wrapper``): its ~300 kernel
    # calls a step without Python between them (one stream ~20 % faster on a
    # 2-core CPU), for a longer compile (benchmarks/NOTES.md). CPU only.
    compile_cpp_wrapper: bool = True
    # "auto" (triton on CUDA when installed, else torch), "torch" or "triton".
    attention_backend: str = "auto"
    # Decode-only steps of at most this many sequences replay CUDA graphs
    # captured at start-up; 0 = off, None = min(max_num_seqs, 256) on CUDA
    # with the triton backend. GPU only.
    cuda_graph_max_batch_size: int | None = None
    # One model over tensor_parallel_size x pipeline_parallel_size processes
    # (hawker/distributed/): started here on one node, or by torchrun.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Row-parallel layers all-reduce in this many chunks, each while the next
    # is multiplied; 1 = off (one blocking all-reduce per layer).
    tp_overlap_chunks: int = 1
    # Batch-invariant numerics: a request's tokens and logprobs are bitwise
    # the same whatever shares its steps (fixed row tiles, one query at a
    # time; much slower for large batches). Turns the CPU fast paths off.
    deterministic: bool = False
    # Prepare and launch step N+1 while step N runs on the device, reading
    # N's tokens back afterwards; None = on for one process on a GPU (on a
    # CPU the forward runs on the host, so nothing would overlap).
    overlap_scheduling: bool | None = None
    # A token's numbers independent of the step's size (prefix-cache hits,
    # n > 1 and steps of up to 16 decodes give the same greedy text as a
    # cold request): fixed row tiles and kernels chosen by the kind of row
    # (hawker/layers/projection.py). None = on for the torch attention
    # backend (CPU), which is what it covers; False = size-tuned kernels.
    consistent_numerics: bool | None = None
    # Decodes read the paged KV cache in place, all in one call per layer,
    # through a small C kernel built on first use (hawker/kernels/
    # cpu_decode_attention.py). None = on for the torch attention backend on a
    # CPU wherever it builds (else padded SDPA per length group); False = off.
    native_decode_attention: bool | None = None
    # Prompt chunks attend over the paged KV cache in place, all in one call
    # per layer, through a small C kernel (hawker/kernels/
    # cpu_prefill_attention.py): several times torch's CPU flash attention,
    # and row-invariant, so consistent numerics needs no query tiles. None = on
    # for the torch attention backend on a CPU wherever it builds; False = off.
    native_prefill_attention: bool | None = None

    def __post_init__(self) -> None:
        if self.compile_warmup not in WARM_UP_MODES:
            raise ValueError(f"compile_warmup must be one of {', '.join(WARM_UP_MODES)}, got {self.compile_warmup!r}")
        if self.overlap_scheduling and self.world_size > 1:
            raise ValueError("overlap_scheduling needs one process (no tensor or pipeline parallelism); set it off")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


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
    return int(DEFAULT_CPU_KV_CACHE_GB * 1024**3)


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
    return dataclasses.replace(options, attention_backend="torch", **dict.fromkeys(_SHAPE_DEPENDENT_OPTIONS, 0))


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
        compile_warmup=options.compile_warmup,
        compile_cpp_wrapper=options.compile_cpp_wrapper,
        native_decode_attention=_native_attention(
            options.native_decode_attention, "decode", options, attention_backend, model_config
        ),
        native_prefill_attention=_native_attention(
            options.native_prefill_attention, "prefill", options, attention_backend, model_config
        ),
    )
    return config, checkpoint


@dataclass(frozen=True)
class RankShard:
    """What one rank of a tensor x pipeline world loaded: its groups, config, model shard and tokenizer."""

    world: World
    config: EngineConfig
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    threads_before: int  # torch's thread count before the ranks shared the cores


def load_rank_shard(options: EngineOptions, spec: WorldSpec, rank: int) -> RankShard:
    """Join the world at ``spec`` as ``rank`` and load this rank's shard (the driver and every worker)."""
    from hawker.distributed import world  # torch.distributed set-up only when asked for

    device = world.rank_device(resolve_device(options.device), rank)
    threads_before = world.share_cpu_cores(device, spec.world_size)
    joined = world.join_world(spec, rank, device)
    try:
        config, checkpoint = engine_config(dataclasses.replace(options, device=device), joined.parallel)
        model = build_model(config, checkpoint, joined.tp_group)
        return RankShard(joined, config, model, load_tokenizer(Path(checkpoint.path)), threads_before)
    except BaseException:
        world.leave_world()
        raise


def _warm_up_blocks(config: EngineConfig) -> int:
    rows = config.compile_decode_max_rows
    return scratch_blocks(rows, config.cache.block_size) if rows and config.compile_warmup == "background" else 0


def num_kv_blocks(config: EngineConfig, model: torch.nn.Module) -> int:
    if config.cache.sized_by_profiling:
        return profile_num_blocks(config, model, config.cache.gpu_memory_utilization)
    parallel = config.parallel
    return config.cache.blocks_for(config.model, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters (for /metrics)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_steps: int
    num_failed_requests: int


# A hook run before each forward pass with the sequences it is about to run;
# raising from it fails them exactly as a model error would (tests inject faults).
StepHook = Callable[[tuple[ScheduledSeq, ...]], None]


@dataclass
class _Counters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    num_failed_requests: int = 0
    num_step_retries: int = 0  # steps whose forward raised and were rerun one sequence at a time


class _Completed:
    """A step that ran to completion when launched (the distributed runners)."""

    def __init__(self, output: ModelOutput) -> None:
        self.output = output

    def result(self) -> ModelOutput:
        return self.output


@dataclass(frozen=True)
class _InFlight:
    """A launched step whose sampled tokens have not been read back."""

    scheduled: SchedulerOutput
    requests: dict[str, Request]  # its sequences' requests when it was launched
    sampled: list[Request]  # those it gave a pending token, in order
    handle: LaunchedStep | _Completed


@dataclass
class _Group:
    """The sequences of one user request and what is reported back."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    finished: list[bool] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        world: World | None = None,
        workers: WorkerProcesses | None = None,
    ) -> None:
        """``world``: this is rank 0 of several (``workers``: the ranks it started itself)."""
        self.config = config
        self.tokenizer = tokenizer
        num_blocks = num_kv_blocks(config, model)
        if world is not None:
            num_blocks = world.min_over_ranks(num_blocks)  # every rank's pool must hold the same blocks
        # A background compile's dummy steps write to the cache's last blocks: never handed out.
        reserved = _warm_up_blocks(config)
        if num_blocks <= reserved:
            raise ValueError(f"the KV pool has {num_blocks} blocks; the background compile needs {reserved} more")
        self.kv = KVCacheManager(num_blocks - reserved, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.eos_token_id = eos_id(config.model, tokenizer)
        self.runner: ModelRunner | DriverRunner
        self.weight_version = 0  # bumped by every update_weights; reported on every output
        self.paused = False  # pause_generation: steps do nothing until resume_generation
        self.sleep_level = 0  # sleep(): 1 = KV cache released, 2 = weights too
        self.threads_before: int | None = None  # torch's thread count before a distributed engine shared the cores
        if world is None:
            self.runner = ModelRunner(config, model, num_blocks, self.eos_token_id)
        else:
            from hawker.distributed.executor import DriverRunner
            from hawker.distributed.pipeline import stage_links

            local = ModelRunner(config, model, num_blocks, self.eos_token_id, stage_links(world))
            self.runner = DriverRunner(local, world, workers)
        self.groups: dict[str, _Group] = {}
        self._arrivals = itertools.count()
        self.counters = _Counters()
        self.pre_execute_hooks: list[StepHook] = []
        self._in_flight: _InFlight | None = None  # overlap scheduling: the step launched last
        self._undelivered: list[RequestOutput] = []  # outputs of a step completed outside step()
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens",
            config.model.architecture,
            num_blocks,
            config.cache.block_size,
        )

    @classmethod
    def from_options(cls, options: EngineOptions) -> Engine:
        options = dataclasses.replace(options, device=resolve_device(options.device))
        if options.world_size > 1:
            return cls._distributed(options)
        config, checkpoint = engine_config(options, ParallelConfig())
        model = build_model(config, checkpoint)
        return cls(config, model, load_tokenizer(Path(checkpoint.path)))

    @classmethod
    def _distributed(cls, options: EngineOptions) -> Engine:
        """Rank 0 of a tensor x pipeline parallel world: start (or join, under torchrun) the other ranks."""
        from hawker.distributed import launch, world  # torch.distributed set-up only when asked for

        shape = world_shape(options)
        found = launch.torchrun_rank(shape)
        workers = None
        if found is None:
            spec = world.WorldSpec("127.0.0.1", launch.free_port(), **shape)
            workers = launch.WorkerProcesses(spec, dataclasses.asdict(options))
            rank = 0
        else:
            spec, rank = found
            if rank != 0:
                raise ValueError("only rank 0 builds the engine; other ranks run hawker.distributed.worker")
        try:
            shard = load_rank_shard(options, spec, rank)
            engine = cls(shard.config, shard.model, shard.tokenizer, world=shard.world, workers=workers)
            engine.threads_before = shard.threads_before
            return engine
        except BaseException:
            if workers is not None:
                workers.kill()
            world.leave_world()
            raise

    # ------------------------------------------------------------- lifecycle
    @property
    def warming_up(self) -> bool:
        """The compiled decode step is being built in the background (steps run eager meanwhile)."""
        compiled = self.runner.compiled_decode if isinstance(self.runner, ModelRunner) else None
        return compiled is not None and compiled.warming_up

    def check_health(self) -> None:
        """Raise ``EngineFatalError`` if a part of the engine outside this process has died."""
        if not isinstance(self.runner, ModelRunner):
            self.runner.check_health()

    def shutdown(self) -> None:
        """Stop the other ranks of a distributed engine (nothing to do in one process)."""
        if not isinstance(self.runner, ModelRunner):
            self.runner.shutdown()
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
            self.threads_before = None

    # --------------------------------------------------------- weight updates
    def update_weights(self, weights: Iterable[tuple[str, Any]] | str | Path) -> int:
        """Load new values of some or all weights in place; returns the new weight version.

        ``weights``: (Hugging Face name, tensor) pairs, as a trainer's
        ``state_dict().items()`` gives them (only changed tensors are needed),
        or a directory of safetensors files (every file it reads must lie inside
        it, and their headers are checked first: hawker/loader/update_files.py).
        Every name, dtype and shape is checked before anything is written, so a
        bad update changes nothing. Cached prefixes computed with the old
        weights are never matched again.
        """
        if not isinstance(self.runner, ModelRunner):
            raise ValueError("update_weights is not supported with tensor or pipeline parallelism yet")
        self._drain()  # the step in flight sampled with the old weights: read it back first
        model = self.runner.model
        if isinstance(weights, str | Path):
            update = open_update(weights)
            self._check_updatable(model.check_weight_shapes(update.shapes()))
            written = model.load_weights(update.weights(), require_all=False)
        else:
            items = list(weights)
            self._check_updatable(model.check_weight_shapes((name, tuple(t.shape)) for name, t in items))
            written = model.load_weights(items, require_all=False)
        targets = {id(param) for param in written}
        for module in model.modules():
            if isinstance(module, ProjectionCopies) and id(module.weight) in targets:
                module.refresh_copies()
        self.kv.invalidate_prefix_cache()
        self.weight_version += 1
        logger.info("weights updated: %d tensors, version %d", len(written), self.weight_version)
        return self.weight_version

    def pause_generation(self, mode: str = "abort") -> list[RequestOutput]:
        """Stop stepping, e.g. while a trainer updates the weights; returns the outputs this produced.

        ``mode="abort"`` finishes every request in flight (finish_reason
        "abort"; their final outputs are returned); ``"keep"`` leaves them
        waiting, to continue after ``resume_generation`` (tokens sampled
        before and after an update then come from different weights).
        """
        if mode not in ("abort", "keep"):
            raise ValueError(f"mode must be 'abort' or 'keep', got {mode!r}")
        self.paused = True
        self._drain()
        outputs, self._undelivered = self._undelivered, []
        if mode == "keep":
            return outputs
        return outputs + [
            self._finish_group(group, RequestStatus.FINISHED_ABORTED) for group in list(self.groups.values())
        ]

    def resume_generation(self) -> None:
        if self.sleep_level:
            raise ValueError("the engine is asleep: call wake_up() before resume_generation()")
        self.paused = False

    def sleep(self, level: int = 1) -> None:
        """Give memory back (for a trainer on the same device): level 1 the KV cache, level 2 the weights too.

        Needs no request in flight. Generation is paused until ``wake_up``;
        after level 2, wake_up reloads the weights from the checkpoint
        (so pass the trainer's weights with update_weights again).
        """
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level}")
        self._drain()
        if self.has_unfinished_requests():
            raise ValueError("requests are in flight: pause_generation(mode='abort') or let them finish first")
        if not isinstance(self.runner, ModelRunner):
            raise ValueError("sleep is not supported with tensor or pipeline parallelism yet")
        if self.sleep_level:
            raise ValueError("the engine is asleep already")
        if level == 2:
            self._check_updatable(list(self.runner.model.parameters()))  # int4 copies could not be rebuilt
        self.paused = True
        self.runner.release_memory(weights=level == 2)
        self.kv.invalidate_prefix_cache()  # the cached blocks' contents are gone
        self.sleep_level = level

    def wake_up(self) -> None:
        """Take the memory back (reloading the checkpoint's weights after level 2) and resume generation."""
        if not self.sleep_level:
            return
        assert isinstance(self.runner, ModelRunner)
        if self.sleep_level == 2:
            self.runner.restore_memory(open_checkpoint(self.config.model_path).weights())
            self.weight_version += 1  # back to the checkpoint's weights
        else:
            self.runner.restore_memory(None)
        self.sleep_level = 0
        self.paused = False

    def _check_updatable(self, targets: Sequence[torch.nn.Parameter]) -> None:
        ids = {id(param) for param in targets}
        for name, module in self.runner.model.named_modules():
            if isinstance(module, ProjectionCopies) and module.quantized_copy and id(module.weight) in ids:
                raise ValueError(
                    f"{name} keeps a 4/8-bit copy of its quantised checkpoint weight, which new values would "
                    "not match; start the engine with int4_decode_max_rows=0 and int8_dot_matmul=False to take "
                    "weight updates"
                )

    # ------------------------------------------------------------- requests
    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request. A rejected request allocates nothing."""
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = self.validate(prompt_token_ids, params)
        arrived = time.monotonic() if arrival_time is None else arrival_time
        seqs: list[Request] = []
        for index in range(params.n):
            seqs.append(
                Request(
                    request_id=request_id if params.n == 1 else f"{request_id}#{index}",
                    prompt_token_ids=list(prompt_token_ids),
                    sampling_params=params,
                    max_tokens=max_tokens,
                    arrival_index=next(self._arrivals),
                    parent_id=request_id,
                    sample_index=index,
                    prefix_donor_id=seqs[0].request_id if index else None,
                    arrival_time=arrived,
                )
            )
        detoks = [
            IncrementalDetokenizer.for_prompt(
                self.tokenizer,
                prompt_token_ids,
                params.skip_special_tokens,
                params.stop,
                params.include_stop_str_in_output,
            )
            for _ in seqs
        ]
        self.groups[request_id] = _Group(request_id, prompt, list(prompt_token_ids), seqs, detoks, [False] * len(seqs))
        for seq in seqs:
            self.scheduler.add(seq)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the model and pool; returns its max_tokens.

        Reads only configuration, so another thread may call it while a step runs.
        """
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.config.model.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        params.check_vocab(vocab)
        limit = self.max_model_len
        if num_prompt >= limit:
            raise ValueError(
                f"the prompt has {num_prompt} tokens; max_model_len is {limit}, so at most {limit - 1} fit"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise ValueError(
                f"max_tokens is {max_tokens} and the prompt has {num_prompt} tokens: "
                f"{num_prompt + max_tokens} exceeds max_model_len {limit}"
            )
        if params.min_tokens > max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({max_tokens}), got {params.min_tokens}")
        needed = self.kv.blocks_needed(num_prompt + max_tokens)
        if needed > self.kv.num_blocks:
            raise ValueError(
                f"the request needs {needed} KV blocks ({num_prompt} prompt + {max_tokens} new tokens) "
                f"but the pool has only {self.kv.num_blocks}"
            )
        return max_tokens

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request at any point; every block it holds returns to the pool.

        Returns its final output (finish_reason "abort" for the sequences still
        running), or None if the request is unknown or already finished.
        """
        group = self.groups.get(request_id)
        return None if group is None else self._finish_group(group, RequestStatus.FINISHED_ABORTED)

    def _finish_group(self, group: _Group, status: RequestStatus) -> RequestOutput:
        """Finish every sequence of ``group`` with ``status``; returns the group's final output."""
        for seq in group.seqs:
            self.scheduler.finish(seq.request_id, status)
        group.finished = [True] * len(group.seqs)
        return self._output(group)

    def has_unfinished_requests(self) -> bool:
        """Requests are running, or a step is in flight, or outputs wait to be returned by ``step()``."""
        return bool(self.groups) or self._in_flight is not None or bool(self._undelivered)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.groups)

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.stats.queried_tokens,
            prefix_cache_hits=kv.stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.counters.prompt_tokens,
            generation_tokens=self.counters.generation_tokens,
            num_steps=self.counters.num_steps,
            num_failed_requests=self.counters.num_failed_requests,
        )

    # ----------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one schedule -> launch -> update round; returns outputs of requests that changed.

        With overlap scheduling the update is of the step launched before:
        this step is scheduled (each sequence sampled by the step in flight
        has its token pending, read on the device) and queued first, then
        the previous step's tokens are read back and applied, so the device
        has the next step to run while the host does that work. A request
        that stops on a read-back token has its part of the newer step
        ignored. Without it, each step is read back as soon as launched.

        If the forward pass raises, the step's sequences are run again one at
        a time, so that only the requests that fail alone are failed (with
        finish_reason "error"); the others continue. ``EngineFatalError`` is
        not contained: it propagates to the caller.
        """
        outputs, self._undelivered = self._undelivered, []
        if self.paused:
            return outputs
        if self._in_flight is not None and not self._can_overlap(self._in_flight):
            outputs += self._complete_in_flight()
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return outputs + self._complete_in_flight()
        self.counters.num_steps += 1
        previous = self._in_flight
        try:
            handle = self._launch(scheduled.seqs, previous)
        except EngineFatalError:
            raise
        except Exception as error:  # isolate the requests that cause it
            logger.warning("step of %d sequences failed (%s); retrying them one by one", len(scheduled.seqs), error)
            self.counters.num_step_retries += 1
            outputs += self._complete_in_flight()
            return outputs + self._step_isolated(self._with_known_tokens(scheduled))
        self._in_flight = self._commit(scheduled, handle)
        if previous is not None:
            outputs += self._complete(previous)
        if not self.config.overlap_scheduling or not self.scheduler.has_unfinished:
            # Nothing to overlap with (when every request stopped on a token just read back).
            outputs += self._complete_in_flight()
        return outputs

    def _can_overlap(self, flight: _InFlight) -> bool:
        # Penalties read every earlier token on the host, pending ones included.
        return not any(request.sampling_params.uses_penalties for request in flight.sampled)

    def _launch(self, seqs: tuple[ScheduledSeq, ...], previous: _InFlight | None) -> LaunchedStep | _Completed:
        for hook in self.pre_execute_hooks:
            hook(seqs)
        step = SchedulerOutput(seqs=seqs)
        if isinstance(self.runner, ModelRunner):
            return self.runner.launch(step, None if previous is None else previous.handle)
        assert previous is None, "overlap scheduling runs in one process"
        output = self.runner.execute(step)
        assert output is not None, "the driver's runner always returns the sampled tokens"
        return _Completed(output)

    def _commit(self, scheduled: SchedulerOutput, handle: LaunchedStep | _Completed) -> _InFlight:
        """Advance the scheduler past a launched step (its samples pending) and remember what it ran."""
        requests = {seq.request_id: self.scheduler.requests[seq.request_id] for seq in scheduled.seqs}
        return _InFlight(scheduled, requests, self.scheduler.commit_step(scheduled), handle)

    def _complete(self, flight: _InFlight) -> list[RequestOutput]:
        try:
            output = flight.handle.result()
        except Exception as error:  # the device failed after the launch: no later step can be trusted
            raise EngineFatalError(f"reading back a step's results failed: {type(error).__name__}: {error}") from error
        return self._update(flight, output)

    def _complete_in_flight(self) -> list[RequestOutput]:
        flight, self._in_flight = self._in_flight, None
        return [] if flight is None else self._complete(flight)

    def _drain(self) -> None:
        """Read back the step in flight; its outputs are returned by the next ``step()`` (or pause)."""
        self._undelivered += self._complete_in_flight()

    def _with_known_tokens(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """``scheduled``'s live sequences with their pending tokens replaced by the read-back ones."""
        seqs = []
        for seq in scheduled.seqs:
            request = self.scheduler.requests.get(seq.request_id)
            if request is None:  # it stopped on the token read back
                continue
            known = tuple(request.token_ids[seq.start_pos : seq.start_pos + seq.num_tokens])
            seqs.append(dataclasses.replace(seq, token_ids=known))
        return SchedulerOutput(seqs=tuple(seqs))

    def _step_isolated(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        """Run each sequence alone; fail the groups whose sequence still fails."""
        results: dict[str, SeqResult] = {}
        failed: list[RequestOutput] = []
        for seq in scheduled.seqs:
            request = self.scheduler.requests.get(seq.request_id)
            if request is None:  # its group failed earlier in this loop
                continue
            try:
                results.update(self._launch((seq,), None).result().results)
            except EngineFatalError:
                raise
            except Exception as error:
                group_id = request.parent_id or request.request_id
                logger.exception("request %s failed in the model", group_id)
                failed.append(self.fail(group_id, f"{type(error).__name__}: {error}"))
        # Failing a group removed all its sequences from the scheduler, including any that ran before.
        survivors = SchedulerOutput(seqs=tuple(s for s in scheduled.seqs if s.request_id in self.scheduler.requests))
        return failed + self._complete(self._commit(survivors, _Completed(ModelOutput(results))))

    def fail(self, request_id: str, reason: str) -> RequestOutput:
        """Finish every sequence of a request with finish_reason "error"; returns its final output."""
        self.counters.num_failed_requests += 1
        output = self._finish_group(self.groups[request_id], RequestStatus.FINISHED_ERROR)
        output.error = reason
        return output

    def _update(self, flight: _InFlight, model_output: ModelOutput) -> list[RequestOutput]:
        """Apply a step's read-back results to the requests that are still the ones it ran."""
        scheduled = flight.scheduled
        for seq in scheduled.seqs:
            result = model_output.results.get(seq.request_id)
            request = flight.requests[seq.request_id]
            if result is not None and result.prompt_logprobs and self._is_live(request):
                _record_prompt_logprobs(request, seq.start_pos, result.prompt_logprobs)
        self.counters.prompt_tokens += sum(
            max(0, min(s.start_pos + s.num_tokens, s.num_prompt_tokens) - s.start_pos) for s in scheduled.seqs
        )
        touched: dict[str, _Group] = {}
        now = time.monotonic()
        for request in flight.sampled:
            if not self._is_live(request):  # it finished (stopped, aborted) while the step ran
                continue
            result = model_output.results[request.request_id]
            token = result.token_id
            assert token is not None, "a sampling sequence always gets a token"
            group = self.groups[request.parent_id or request.request_id]
            request.resolve_token(token)
            self.kv.cache_full_blocks(request)  # the block holding it may be computed already
            self.counters.generation_tokens += 1
            if request.first_token_time is None:
                request.first_token_time = now
            if result.logprobs is not None:
                request.logprobs.append(result.logprobs)
            self._check_stop(group, request, token)
            touched[group.request_id] = group
        return [self._output(group) for group in touched.values()]

    def _is_live(self, request: Request) -> bool:
        return self.scheduler.requests.get(request.request_id) is request

    def _check_stop(self, group: _Group, request: Request, token: int) -> None:
        params = request.sampling_params
        detok = group.detokenizers[request.sample_index]
        stop_string = detok.add_token(token)
        status: RequestStatus | None = None
        reason: int | str | None = None
        # Counts of known tokens: with overlap the next one may be pending already.
        num_output = request.num_known_tokens - request.num_prompt_tokens
        under_min = num_output < params.min_tokens
        if stop_string is not None and not under_min:
            status, reason = RequestStatus.FINISHED_STOPPED, stop_string
        elif not under_min and token == self.eos_token_id and not params.ignore_eos:
            status = RequestStatus.FINISHED_STOPPED
        elif not under_min and token in params.stop_token_ids:
            status, reason = RequestStatus.FINISHED_STOPPED, token
        elif num_output >= request.max_tokens or request.num_known_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(request.request_id, status, reason)
            group.finished[request.sample_index] = True

    def _output(self, group: _Group) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.sample_index,
                text=detok.text if seq.finished else detok.streamable_text(),
                token_ids=list(seq.output_token_ids),
                logprobs=list(seq.logprobs) if seq.sampling_params.logprobs is not None else None,
                finish_reason=seq.status.value if seq.finished else None,
                stop_reason=seq.stop_reason,
            )
            for seq, detok in zip(group.seqs, group.detokenizers, strict=True)
        ]
        finished = all(group.finished)
        first = group.seqs[0]
        if finished:
            del self.groups[group.request_id]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            prompt_logprobs=list(first.prompt_logprobs) if first.wants_prompt_logprobs else None,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=_timings(first),
            weight_version=self.weight_version,
        )


def _timings(request: Request) -> dict[str, float]:
    times = {
        "arrival_time": request.arrival_time,
        "first_scheduled_time": request.first_scheduled_time,
        "first_token_time": request.first_token_time,
    }
    return {name: value for name, value in times.items() if value is not None}


def _record_prompt_logprobs(request: Request, start_pos: int, entries: list[PositionLogprobs]) -> None:
    """Store logprobs of prompt tokens start_pos+1 ...; a recompute after preemption adds nothing twice."""
    if not request.prompt_logprobs:
        request.prompt_logprobs.append(None)  # the first prompt token has no context
    for offset, entry in enumerate(entries):
        if start_pos + 1 + offset == len(request.prompt_logprobs):
            request.prompt_logprobs.append(entry)


def eos_id(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.eos_token_id


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
