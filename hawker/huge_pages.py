"""Large host tensors on 2 MB pages where Linux allows it (transparent huge pages in "madvise" mode).

The KV cache is the process's largest allocation (2.1 GB for the default
model). Zeroed on 4 KB pages it took 1.4-3.0 s of a server's start on the
development machine (a page fault each 4 KB, costlier in a fresh VM), on 2 MB
pages 0.45-0.9 s (benchmarks/NOTES.md, session 21); fewer TLB misses for the
attention kernels that read it besides. Where the kernel has no transparent
huge pages (or "never") the advice is refused and nothing changes.
``HAWKER_HUGE_PAGES=0`` switches it off.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch

from hawker.switches import switch_on

HUGE_PAGES_VARIABLE = "HAWKER_HUGE_PAGES"
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_HUGE_PAGE_BYTES = 2 << 20


def huge_pages_on() -> bool:
    """``HAWKER_HUGE_PAGES``: 1 (the default) or 0; another value is a ValueError."""
    return switch_on(HUGE_PAGES_VARIABLE)


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the whole 2 MB pages inside ``tensor``'s memory with huge pages (to take effect, before
    they are first touched); whether the advice was taken."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux") or not huge_pages_on():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    last = end // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    if last <= first:
        return False
    return _madvise()(first, last - first, _MADV_HUGEPAGE) == 0


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def zero_on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.zero_()``, its memory first advised onto huge pages (for memory not yet touched)."""
    advise_huge_pages(tensor)
    return tensor.zero_()


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros(shape)``, on huge pages where a CPU tensor may have them."""
    return zero_on_huge_pages(torch.empty(shape, dtype=dtype, device=device))
