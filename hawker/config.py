"""Frozen configuration objects, built and validated once.

`ModelConfig` is normalised from a Hugging Face ``config.json`` (or from GGUF
metadata translated into the same keys) so that model code never has to know
which checkpoint format or transformers version produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hawker.options import EngineOptions

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = ("auto", *DTYPES)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a user-facing dtype name to a torch dtype.

    ``auto`` is bfloat16 on both CPU and GPU: half the weight and KV bytes of
    float32, and on CPUs with AMX several times the matmul rate (on AVX512-BF16
    without AMX the matmul rate is below float32's; see benchmarks/RESULTS.md).
    """
    if name == "auto":
        return torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {[*sorted(DTYPES), 'auto']}, got {name!r}")
    del device
    return DTYPES[name]


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling as in HF ``rope_scaling``; ``kind`` in {default, linear, llama3}."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters`; older configs use
    # `rope_theta` + `rope_scaling`. Accept both.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
    return theta, RopeScaling(
        kind=kind,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    dtype: torch.dtype = torch.float32

    @staticmethod
    def from_hf(hf: dict[str, Any], dtype: torch.dtype) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        theta, scaling = _parse_rope(hf)
        use_sliding = hf.get("use_sliding_window", True)
        window = hf.get("sliding_window") if use_sliding else None
        return ModelConfig(
            architecture=archs[0],
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            sliding_window=None if window is None else int(window),
            bos_token_id=_first_int(hf.get("bos_token_id")),
            eos_token_id=_first_int(hf.get("eos_token_id")),
            dtype=dtype,
        )


# kv_cache_dtype: "auto" = the model's dtype; the 8-bit floats (vLLM's names; "fp8" = "fp8_e4m3") halve
# the cache's bytes: keys and values rounded to them, saturating at their largest value (no scale).
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory for the KV pool; None = measure what is free on the GPU after a
    # worst-case step and take gpu_memory_utilization of the device in all
    # (hawker/engine/memory_profile.py). Ignored when num_blocks is given.
    kv_cache_memory_bytes: int | None = 2 * 1024**3
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # A name in KV_CACHE_DTYPES: the model's dtype ("auto") or an 8-bit float.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def torch_dtype(self, model: ModelConfig) -> torch.dtype:
        """What the KV cache holds: the model's dtype, or the 8-bit float asked for."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model.dtype

    @property
    def sized_by_profiling(self) -> bool:
        return self.num_blocks is None and self.kv_cache_memory_bytes is None

    def blocks_for(self, model: ModelConfig, tp_size: int = 1, pp_size: int = 1) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_cache_memory_bytes is None:
            raise ValueError("the KV cache is sized by profiling the device (hawker/engine/memory_profile.py)")
        per_block = bytes_per_kv_block(model, self, tp_size, pp_size)
        return max(1, self.kv_cache_memory_bytes // per_block)


def bytes_per_kv_block(model: ModelConfig, cache: CacheConfig, tp_size: int = 1, pp_size: int = 1) -> int:
    """Bytes of one KV block on one rank: its KV heads (replicated when fewer than the ranks), its stage's layers."""
    kv_heads = max(1, model.num_kv_heads // tp_size)
    layers = -(-model.num_layers // pp_size)  # the largest stage
    elem = torch.empty((), dtype=cache.torch_dtype(model)).element_size()
    return 2 * layers * cache.block_size * kv_heads * model.head_dim * elem


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ParallelConfig:
    """This process's place in the tensor x pipeline grid (global rank = pp_rank * tp_size + tp_rank)."""

    tensor_parallel_size: int = 1
    tensor_parallel_rank: int = 0
    pipeline_parallel_size: int = 1
    pipeline_parallel_rank: int = 0
    # Row-parallel layers reduce their output in this many chunks, each
    # while the next is multiplied (1 = one blocking all-reduce).
    tp_overlap_chunks: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        if not 0 <= self.tensor_parallel_rank < self.tensor_parallel_size:
            raise ValueError("tensor_parallel_rank must be in [0, tensor_parallel_size)")
        if not 0 <= self.pipeline_parallel_rank < self.pipeline_parallel_size:
            raise ValueError("pipeline_parallel_rank must be in [0, pipeline_parallel_size)")
        if self.tp_overlap_chunks < 1:
            raise ValueError(f"tp_overlap_chunks must be >= 1, got {self.tp_overlap_chunks}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def rank(self) -> int:
        return self.pipeline_parallel_rank * self.tensor_parallel_size + self.tensor_parallel_rank


PLAN_CACHE_MODES = ("reuse", "refresh", "off")


@dataclass(frozen=True)
class MatmulOptions:
    """What the projections' measured plans may use (hawker/layers/matmul_plan.py), resolved from the options."""

    # None: measured; 0: never; n > 0: every step of up to n rows (layers that are 4/8-bit in the checkpoint).
    int4_max_rows: int | None = None
    # None: measured; 0: never; n > 0: every step of at least n rows (half-precision weights).
    fp32_min_rows: int | None = None
    # oneDNN-prepacked weights (hawker/kernels/packed_linear.py): None = measured where oneDNN has them; False = never.
    packed: bool | None = None
    # bfloat16 weights in panels for a C kernel (hawker/kernels/panel_linear.py): None = measured where
    # the CPU has AVX512-BF16; False = never.
    panel: bool | None = None
    # bfloat16 weights by AMX tile multiplies in a C kernel (hawker/kernels/amx_linear.py): None = measured
    # where the CPU has AMX; False = never.
    amx: bool | None = None
    # Weights on GGUF Q4_1's grid kept as 4-bit codes for the AMX kernel, dequantised into the same bfloat16
    # tiles (hawker/kernels/amx_linear.py, the same bits): None = measured where the AMX copy may be; False = never.
    amx_q4: bool | None = None
    # 4/8-bit checkpoint weights by 8-bit integer dot products, activations quantised per group of 32
    # (hawker/kernels/int8_dot_linear.py): None = measured for half-precision models on a CPU with
    # AVX512-VNNI; True = float32 models too; False = never.
    int8_dot: bool | None = None
    # Consistent numerics: a token's numbers do not depend on the step's row count.
    consistent: bool = False
    # The most rows a projection (the token budget) and the LM head (sampled rows) see in one step.
    max_rows: int = 2048
    sample_rows: int = 128
    # Timed passes per (copy, row count); the best one counts.
    repeats: int = 3
    # Measured plans on disk (hawker/layers/plan_cache.py): "reuse" them, "refresh" (measure, keep), "off".
    cache: str = "reuse"

    def __post_init__(self) -> None:
        if self.cache not in PLAN_CACHE_MODES:
            raise ValueError(f"the matmul plan cache must be one of {PLAN_CACHE_MODES}, got {self.cache!r}")
        for name in ("int4_max_rows", "fp32_min_rows"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off) or None (measured), got {value}")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "cpu"
    seed: int = 0
    # How projections pick a weight copy per step, measured at start-up
    # (hawker/layers/matmul_plan.py); None = plain F.linear (a GPU, batch-invariant mode).
    matmul: MatmulOptions | None = None
    # Decode-only steps of at most this many rows run a torch.compile'd
    # forward (hawker/engine/compiled_decode.py); 0 turns that off.
    compile_decode_max_rows: int = 0
    # "torch" or "triton" (hawker/attention/), resolved from the user's "auto".
    attention_backend: str = "torch"
    # Decode-only steps of at most this many sequences replay CUDA graphs
    # captured at start-up (hawker/engine/decode_graphs.py); 0 turns that off.
    cuda_graph_max_batch_size: int = 0
    # Batch-invariant numerics (hawker/layers/batch_invariant.py): a request's
    # tokens and logprobs do not depend on what else shares its steps.
    batch_invariant: bool = False
    # Schedule and launch step N+1 before reading back step N's tokens
    # (hawker/engine/engine.py), so the device never waits for the host.
    overlap_scheduling: bool = False
    # Consistent numerics (hawker/layers/matmul_plan.py): a token's numbers do
    # not depend on the step's size: projections use row-invariant (or tiled)
    # copies, prefill attention aligned query tiles, and the runner keeps
    # prefill and decode rows in separate forwards.
    consistent_numerics: bool = False
    # "blocking": the compiled decode step is built before the engine is ready;
    # "background": on a thread while steps run eager (hawker/engine/compiled_decode.py).
    compile_warmup: str = "blocking"
    # The compiled step's wrapper is C++ (inductor's cpp_wrapper), not Python.
    compile_cpp_wrapper: bool = True
    # Decodes attend through the in-place C kernel (hawker/kernels/cpu_decode_attention.py).
    native_decode_attention: bool = False
    # Prompt chunks attend through the in-place C kernel (hawker/kernels/cpu_prefill_attention.py).
    native_prefill_attention: bool = False
    # Building a structured-output constraint that takes longer than this is refused (hawker/structured/).
    grammar_compile_timeout_s: float = 10.0
    # The model reasons in <think>...</think> first (deepseek_r1, qwen3): constraints apply after it.
    reasoning_parser: str | None = None
    # The options as the user gave them (hawker/options.py), before resolution.
    options: EngineOptions | None = None
