"""Engine options, each declared once: its type, default, help text and choices.

``EngineOptions`` is what a user sets: the offline API takes its fields as
keyword arguments (``LLM(model, dtype=...)``), the command line's flags are
built from its fields (hawker/cli.py), and the engine resolves it into an
``EngineConfig`` (hawker/engine/configure.py), which keeps it as given.
Adding an option is adding one field here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hawker.attention import BACKENDS
from hawker.config import DTYPE_NAMES, KV_CACHE_DTYPES, PLAN_CACHE_MODES

WARM_UP_MODES = ("background", "blocking")
# Both read <think>...</think>; deepseek_r1's chat template opens the block in the prompt.
REASONING_PARSERS = ("deepseek_r1", "qwen3")
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")


def option(default: Any, help: str, choices: Sequence[str] = (), aliases: Sequence[str] = ()) -> Any:
    """A field of ``EngineOptions``: its default, its help text and, for a string, its allowed values.

    ``aliases``: extra command-line spellings (``-tp``; ``--no-prefix-caching``
    for a boolean that is on by default turns it off).
    """
    metadata = {"help": help, "choices": tuple(choices), "aliases": tuple(aliases)}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class EngineOptions:
    """User-facing engine options (the offline API's keyword arguments and the CLI's flags)."""

    model: str | None = option(
        None, "HF directory (config.json + safetensors) or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    dtype: str = option("auto", "weights and activations dtype; auto = bfloat16", DTYPE_NAMES)
    max_model_len: int | None = option(None, "longest prompt + output in tokens (default: the model's)")
    block_size: int = option(16, "tokens per KV block")
    kv_cache_memory_gb: float | None = option(
        None,
        "memory budget of the KV cache pool in GiB (default: 2 on a CPU; on a GPU what "
        "gpu_memory_utilization leaves after the weights and a worst-case step, measured at start-up)",
    )
    gpu_memory_utilization: float = option(0.9, "fraction of GPU memory for weights, activations and KV cache together")
    num_kv_blocks: int | None = option(None, "KV blocks in the pool (default: what the memory budget holds)")
    kv_cache_dtype: str = option(
        "auto",
        "what the KV cache holds: auto = the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2 halve its bytes, "
        "rounding keys and values to 8 bits (torch attention backend only)",
        tuple(KV_CACHE_DTYPES),
    )
    enable_prefix_caching: bool = option(
        True, "reuse cached full KV blocks of shared prompt prefixes", aliases=("--no-prefix-caching",)
    )
    max_num_batched_tokens: int = option(2048, "token budget of one engine step, prefill chunks + decodes")
    max_num_seqs: int = option(128, "most sequences running concurrently")
    seed: int = option(0, "seed of unseeded sampling")
    device: str = option(
        "auto", "torch device to run on, e.g. cpu, cuda, cuda:1; auto = cuda when a GPU is visible, else cpu"
    )
    int4_decode_max_rows: int | None = option(
        None,
        "steps with at most this many rows use int4 copies of the layers that are 4-bit in the checkpoint "
        "(a quarter of the bytes; 8-bit ones as two int4 halves); 0 = off (default: on a CPU, wherever the "
        "matmul plan measured at start-up finds them faster, for bfloat16 / float16 models)",
    )
    fp32_matmul_min_rows: int | None = option(
        None,
        "steps with at least this many rows multiply half-precision weights through float32 copies (more "
        "memory); 0 = off (default: on a CPU, wherever the measured plan finds that faster: CPUs with "
        "neither AVX512-BF16 nor AMX)",
    )
    packed_matmul: bool | None = option(
        None,
        "multiply through oneDNN-prepacked weights (no weight reorder per call: several times faster for "
        "few rows) (default: on a CPU, wherever the measured plan finds them faster)",
    )
    panel_matmul: bool | None = option(
        None,
        "multiply bfloat16 weights by Hawker's C kernel over weights packed in panels of 32 outputs "
        "(float32 sums, half the bytes of a float32 copy; hawker/kernels/panel_linear.py) (default: on "
        "CPUs with AVX512-BF16, wherever the measured plan finds it faster)",
    )
    amx_matmul: bool | None = option(
        None,
        "multiply bfloat16 weights by Hawker's C kernel of AMX tile multiplies over the panel-packed weight "
        "(each row's sums in a fixed order: consistent numerics uses it untiled; hawker/kernels/amx_linear.py) "
        "(default: on CPUs with AMX, wherever the measured plan finds it faster)",
    )
    amx_q4_matmul: bool | None = option(
        None,
        "keep weights that lie on GGUF Q4_1's 4-bit grid as their codes for the AMX kernel, which dequantises "
        "them into the same bfloat16 tiles (the bits of amx_matmul, a third of the bytes to read; "
        "hawker/kernels/amx_linear.py) (default: with amx_matmul, wherever the measured plan finds it faster)",
    )
    int8_dot_matmul: bool | None = option(
        None,
        "multiply weights that are 4/8-bit in the checkpoint (GGUF Q4_1, Q8_0) by 8-bit integer dot "
        "products, activations quantised to 8 bits per group of 32 as llama.cpp does "
        "(hawker/kernels/int8_dot_linear.py) (default: for half-precision models on CPUs with "
        "AVX512-VNNI, wherever the measured plan finds it faster; on = float32 models too)",
    )
    matmul_plan_cache: str = option(
        "reuse",
        "reuse: the matmul plan measured before on this machine and software, if any "
        "(hawker/layers/plan_cache.py; `hawker prepare` measures it at install time); refresh: measure "
        "and keep; off: measure at every start, keep nothing",
        PLAN_CACHE_MODES,
    )
    compile_decode_max_rows: int | None = option(
        None,
        "decode-only steps of at most this many rows run a torch.compile'd forward, compiled at start-up "
        "(needs a C++ compiler); 0 = off (default: min(max_num_seqs, 256) on a CPU unless "
        "TORCH_COMPILE_DISABLE=1, else off)",
    )
    compile_warmup: str = option(
        "blocking",
        "how that forward is compiled (~100 s the first time on a small CPU, ~15 s with inductor's cache "
        "warm): background = serve at once with eager steps and switch when it is built (/health says "
        "warming_up until then); blocking = before the first step, as benchmarks want (`hawker serve` "
        "defaults to background)",
        WARM_UP_MODES,
    )
    compile_cpp_wrapper: bool = option(
        True,
        "that forward's calls of its ~300 kernels are C++ (inductor's cpp_wrapper), not Python: one stream "
        "~20%% faster on a 2-core CPU, a longer compile",
    )
    attention_backend: str = option(
        "auto", "paged attention implementation; auto = triton on CUDA when installed, else torch", BACKENDS
    )
    cuda_graph_max_batch_size: int | None = option(
        None,
        "decode-only steps of at most this many sequences replay CUDA graphs captured at start-up; 0 = off "
        "(default: min(max_num_seqs, 256) on CUDA with the triton backend, else off)",
    )
    tensor_parallel_size: int = option(1, "shard each layer over this many processes", aliases=("-tp",))
    pipeline_parallel_size: int = option(
        1,
        "split the layers into this many pipeline stages, one process group each; the tensor x pipeline "
        "processes start on this node, or under torchrun across nodes",
        aliases=("-pp",),
    )
    distributed_executor_backend: str = option(
        "mp",
        "how the tensor x pipeline ranks start: mp = processes on this node (or torchrun's, across nodes); "
        "ray = Ray actors in a placement group (one bundle per rank, this node's first) on the cluster at "
        "ray_address (needs the ray extra)",
        DISTRIBUTED_EXECUTOR_BACKENDS,
    )
    ray_address: str | None = option(
        None,
        "the Ray cluster the ray backend joins (ray.init's address; default: RAY_ADDRESS, else a cluster "
        "started on this node with `ray start`, else a new local one)",
    )
    tp_overlap_chunks: int = option(
        1, "row-parallel layers all-reduce in this many chunks, each while the next is multiplied; 1 = off"
    )
    deterministic: bool = option(
        False,
        "batch-invariant numerics: a request's tokens and logprobs are bitwise the same whatever shares its "
        "steps (fixed row tiles, one query at a time; much slower for large batches; turns the CPU fast "
        "paths off)",
    )
    overlap_scheduling: bool | None = option(
        None,
        "schedule and launch step N+1 while step N runs on the device, reading N's tokens back afterwards "
        "(default: on for one process on a GPU; on a CPU the forward runs on the host, so nothing overlaps)",
    )
    consistent_numerics: bool | None = option(
        None,
        "a token's numbers do not depend on the step's size: the same greedy text cold, after a prefix-cache "
        "hit, for every one of n choices and beside up to 16 decoding requests (row-invariant or tiled "
        "matmuls, kernels chosen by the kind of row; hawker/layers/projection.py) (default: on for the "
        "torch attention backend, i.e. on a CPU)",
    )
    native_decode_attention: bool | None = option(
        None,
        "decodes read the paged KV cache in place, all in one call per layer, through a small C kernel built "
        "on first use (hawker/kernels/cpu_decode_attention.py) (default: on for the torch attention backend "
        "on a CPU wherever it builds; else padded SDPA per length group)",
    )
    native_prefill_attention: bool | None = option(
        None,
        "prompt chunks attend over the paged KV cache in place, all in one call per layer, through a small C "
        "kernel (hawker/kernels/cpu_prefill_attention.py): several times torch's CPU flash attention, and "
        "row-invariant (default: on for the torch attention backend on a CPU wherever it builds)",
    )
    reasoning_parser: str | None = option(
        None,
        "the model thinks in <think>...</think> first: the chat API answers that part as reasoning_content, "
        "and an output constraint (JSON schema, regex, grammar, required tool call) applies only once the "
        "thinking has ended; deepseek_r1 (its template opens the block in the prompt) or qwen3",
        REASONING_PARSERS,
    )
    grammar_compile_timeout: float = option(
        10.0,
        "seconds a structured-output constraint (JSON schema, regex, grammar, tool call) may take to compile; "
        "one that takes longer is refused with a 400",
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            choices = spec.metadata["choices"]
            value = getattr(self, spec.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{spec.name} must be one of {', '.join(choices)}, got {value!r}")
        if self.overlap_scheduling and self.world_size > 1:
            raise ValueError("overlap_scheduling needs one process (no tensor or pipeline parallelism); set it off")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def option_types() -> dict[str, type]:
    """Each option's value type (``int`` for ``int | None``): what the command line parses its flag as."""
    hints = typing.get_type_hints(EngineOptions)
    found: dict[str, type] = {}
    for name, hint in hints.items():
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        found[name] = args[0] if args else hint
    return found
