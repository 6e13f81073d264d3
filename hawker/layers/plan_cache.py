"""Measured matmul plans kept on disk, so that a start-up on a machine already measured skips the timing.

Measuring a plan (hawker/layers/matmul_plan.py) times every copy of every
group of layers at nine row counts and probes row invariance: 2.4 s of
start-up on one 2-core machine, 6-7 s on a slower one, most of a first
answer's wait. The result depends only on the machine, the software and the
group's shape and options, never on the weights' values, so it is kept in
one small JSON file per group, named by a hash of:

- the CPU (model name, feature flags), torch's version and thread count;
- the source of the plan's code, of the weight copies it times and of the C kernels among them;
- the group (LM head or not, weight shape and dtype, the copies it has) and
  every option that bounds the choice (forced ranges, consistent numerics,
  row limits, repeats).

Any of these changing names another file, so a stale plan is never loaded.
``hawker prepare`` (run by ``scripts/setup.sh``) measures the default
model's plans once at install time; ``matmul_plan_cache="off"`` (``hawker
serve --matmul-plan-cache off``) measures at every start and writes nothing.
The files live beside the native kernels (hawker/kernels/native.py,
``HAWKER_KERNEL_CACHE``), in ``matmul-plans/``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from hawker.config import MatmulOptions
from hawker.kernels import native
from hawker.layers import matmul_plan, weight_copies
from hawker.layers.matmul_plan import LayerPlan, PlanStep

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache  # read once per process: every group's key needs it
def _machine_and_code() -> tuple[str, ...]:
    """What any plan measured here depends on besides its group: the CPU, the software, the plan's code."""
    modules = [Path(module.__file__ or "") for module in (matmul_plan, weight_copies)]
    kernels = [native.SOURCE_DIR / name for name in ("panel_linear.c", "int8_dot_linear.c", "amx_linear.c")]
    sources = [path.read_bytes() for path in [*modules, *kernels]]
    code = hashlib.sha256(b"".join(sources)).hexdigest()
    return (_cpu_model(), native.cpu_features(), torch.__version__, code)


def plan_key(is_head: bool, weight: torch.Tensor, kernels: list[str], options: MatmulOptions, limit: int) -> str:
    """The file name of one group's plan (module docstring)."""
    # Threads are read at every call: data-parallel replicas split them within one process.
    group = [
        str(torch.get_num_threads()),
        str(is_head),
        str(tuple(weight.shape)),
        str(weight.dtype),
        ",".join(kernels),
        str(limit),
    ]
    bounds = {name: value for name, value in asdict(options).items() if name != "cache"}
    choices = json.dumps(bounds, sort_keys=True)
    digest = hashlib.sha256("\n".join([str(FORMAT_VERSION), *_machine_and_code(), *group, choices]).encode())
    return digest.hexdigest()[:24]


def plan_dir() -> Path:
    return native.cache_dir() / "matmul-plans"


def load(key: str) -> LayerPlan | None:
    """The plan stored under ``key``; None where there is none or it cannot be read (then it is measured)."""
    path = plan_dir() / f"{key}.json"
    try:
        steps = json.loads(path.read_text())["steps"]
        return LayerPlan(tuple(PlanStep(int(s["max_rows"]), str(s["kernel"]), int(s["tile"])) for s in steps))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring an unreadable matmul plan %s (%s); measuring it again", path, error)
        return None


def store(key: str, plan: LayerPlan) -> None:
    """Write ``plan`` under ``key`` (to a temporary file, then renamed: a reader never sees half a file)."""
    folder = plan_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as handle:
            json.dump({"steps": [asdict(step) for step in plan.steps]}, handle)
        Path(handle.name).replace(folder / f"{key}.json")
    except OSError as error:  # a read-only home still serves, measuring at every start
        logger.warning("could not keep the matmul plan in %s: %s", folder, error)
