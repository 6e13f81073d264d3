"""Small C kernels for the CPU path, compiled on first use and kept in a cache folder.

A kernel here is one plain C file under ``csrc/`` (with the headers there)
and no Python or torch headers, so compiling it takes well under a second.
A kernel whose per-call cost matters may add ``csrc/<name>_op.cpp``: its torch
operator's CPU kernel in C++ (only the lean ATen headers: ~7 s once on a 2-core
machine), so the dispatcher reaches the C code without going through Python
(``load_op_library``). It is built for this machine
(``-march=native``) with OpenMP and linked against the OpenMP runtime torch
has already loaded, so both share one thread pool. The shared object is
keyed by a hash of the source, the flags, the compiler and the CPU's
features, so a changed file or another machine never loads a stale build.

Set ``HAWKER_KERNEL_CACHE`` to choose the folder (default
``$XDG_CACHE_HOME/hawker/kernels``, else ``~/.cache/hawker/kernels``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch  # loaded first: its OpenMP runtime is the one the kernels link against

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


def cache_dir() -> Path:
    explicit = os.environ.get("HAWKER_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hawker" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build_key(source: bytes, flags: list[str], compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), version.encode(), cpu_features().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _compile(
    source_path: Path, target: Path, compiler: str, flags: list[str], links: tuple[str, ...] | list[str] = ("-lm",)
) -> None:
    """Compile to a temporary file, then rename: concurrent builders never see a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
        partial = Path(handle.name)
    try:
        subprocess.run(
            [compiler, *flags, str(source_path), "-o", str(partial), *links],
            check=True,
            capture_output=True,
            text=True,
        )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def load_kernel_library(name: str, defines: tuple[tuple[str, int], ...] = ()) -> ctypes.CDLL | None:
    """``csrc/<name>.c`` built (with ``-DNAME=value`` for each of ``defines``) and loaded; None (with a
    warning) where it cannot be built here. Each set of defines is a build of its own."""
    source_path = SOURCE_DIR / f"{name}.c"
    flags = [*FLAGS, *(f"-D{key}={value}" for key, value in defines)]
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found (set CC): the %s kernel falls back to torch", name)
        return None
    # The headers beside it count as its source: a changed header must rebuild it.
    source = b"".join(path.read_bytes() for path in [source_path, *sorted(SOURCE_DIR.glob("*.h"))])
    target = cache_dir() / f"{name}-{_build_key(source, flags, compiler)}.so"
    try:
        if not target.exists():
            _compile(source_path, target, compiler, flags)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        logger.warning("could not build the %s kernel, falling back to torch: %s", name, detail.strip()[:2000])
        return None


# A C function loaded from a shared library (ctypes' function pointer type is private).
CFunction = Any


def built_kernel(name: str, argtypes: list[Any]) -> CFunction | None:
    """``hawker_<name>`` from ``csrc/<name>.c`` (returning int, taking ``argtypes``), or None where it cannot be
    built here or was built without the instructions it needs (its ``hawker_<name>_built()`` returns 0)."""
    library = load_kernel_library(name)
    if library is None or not getattr(library, f"hawker_{name}_built")():
        return None
    function = getattr(library, f"hawker_{name}")
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def load_op_library(name: str, kernel: ctypes.CDLL | None = None) -> ctypes.CDLL | None:
    """Build ``csrc/<name>.cpp`` (a torch operator's C++ kernel, over ``kernel``'s C functions if given)
    against torch's headers and load it into torch's dispatcher; returns the loaded library (for its own
    C functions), or None (with a warning) where it cannot be built here.

    Keyed like the C kernels, plus torch's version and the C library it links (whose file name is its own
    key). The first build takes ~7 s on a 2-core machine; ``hawker prepare`` does it ahead."""
    compiler = _cxx_compiler()
    if compiler is None:
        return None
    torch_dir = Path(torch.__file__).resolve().parent
    source_path = SOURCE_DIR / f"{name}.cpp"
    abi = int(torch.compiled_with_cxx11_abi())
    flags = ["-O2", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}"]
    links = [
        *([kernel._name] if kernel is not None else []),
        f"-L{torch_dir / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]
    key_parts = [*flags, *links, torch.__version__]
    try:
        target = cache_dir() / f"{name}-{_build_key(source_path.read_bytes(), key_parts, compiler)}.so"
        if not target.exists():
            _compile(source_path, target, compiler, flags, links)
        torch.ops.load_library(str(target))
        return ctypes.CDLL(str(target))  # dlopen of a loaded path: the same handle
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        logger.warning("could not build the %s operator, calling its kernel from Python: %s", name, detail[:2000])
        return None


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


# How the attention kernels' dtype argument names a dtype (csrc/attention_common.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The 8-bit floats a KV cache may hold instead of the queries' dtype (``kv_cache_dtype``).
FLOAT8_CACHE_CODES = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 4}


def attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``q`` as the attention kernels read it: [tokens, heads, dim] with heads and dims dense (tokens may be
    strided), and the cache's dtype code; raises unless the caches are contiguous and of q's dtype or an
    8-bit float."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    return q, cache_dtype_code(q.dtype, k_cache, v_cache)


def cache_dtype_code(q_dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The kernels' code for the caches' dtype: the queries' own, or an 8-bit float."""
    dtype = k_cache.dtype
    if v_cache.dtype != dtype or (dtype != q_dtype and dtype not in FLOAT8_CACHE_CODES):
        raise ValueError(f"queries are {q_dtype} but the cache is {dtype} / {v_cache.dtype}")
    return FLOAT8_CACHE_CODES.get(dtype, DTYPE_CODES[q_dtype])


def define_op(name: str, schema: str, fake: Callable[..., Any]) -> None:
    """Define ``name`` ("namespace::op") with a fake (for compiled graphs' shapes) but no kernel yet: the
    caller registers one (from C++ or Python) before the first call. Defined once per process."""
    namespace, op = name.split("::")
    if hasattr(getattr(torch.ops, namespace), op):
        return
    torch.library.define(name, schema)
    torch.library.register_fake(name, fake)


def define_cpu_op(
    name: str, schema: str, kernel: Callable[..., Any], fake: Callable[..., Any], extra_keys: tuple[str, ...] = ()
) -> None:
    """Register ``name`` ("namespace::op") with a CPU kernel and a fake (for compiled graphs' shapes).

    ``torch.library.define`` keeps the library alive itself, so nothing is
    held here. Defined once per process: a module imported again (tests that
    reload) must not define the op twice."""
    namespace, op = name.split("::")
    if hasattr(getattr(torch.ops, namespace), op):
        return
    torch.library.define(name, schema)
    torch.library.impl(name, "cpu", kernel)
    for key in extra_keys:  # e.g. "MkldnnCPU": an argument that is an opaque oneDNN tensor dispatches there
        torch.library.impl(name, key, kernel)
    torch.library.register_fake(name, fake)


def int64_arrays(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor as contiguous int64, as the kernels take their tables and lengths."""
    return [tensor.to(torch.int64).contiguous() for tensor in tensors]
