"""The KV cache's zeroed tensors on 2 MB pages (hawker/huge_pages.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hawker.huge_pages import HUGE_PAGES_VARIABLE, advise_huge_pages, zeros_on_huge_pages

CPU = torch.device("cpu")
SHAPE = (300, 16, 3, 64)  # 1.8 MB of bfloat16 a tensor: at least one whole 2 MB page is not guaranteed
LARGE = (2000, 16, 3, 64)  # 12 MB: several whole 2 MB pages


def _huge_page_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return "none"
    return path.read_text().split("[")[1].split("]")[0]


def test_the_tensor_is_zeros_of_its_shape_and_dtype_whether_or_not_the_advice_is_taken() -> None:
    for shape in (SHAPE, LARGE):
        tensor = zeros_on_huge_pages(shape, torch.bfloat16, CPU)
        assert tensor.shape == shape and tensor.dtype == torch.bfloat16
        assert not bool(tensor.any())


def test_memory_reused_from_an_earlier_tensor_is_zeroed_too() -> None:
    for _ in range(3):  # a freed tensor's dirty memory may come back from the allocator
        dirty = torch.full(LARGE, 7.0, dtype=torch.bfloat16)
        del dirty
        assert not bool(zeros_on_huge_pages(LARGE, torch.bfloat16, CPU).any())


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _huge_page_mode() not in ("always", "madvise"),
    reason="no transparent huge pages on this machine",
)
def test_linux_takes_the_advice_for_a_tensor_with_whole_huge_pages() -> None:
    assert advise_huge_pages(torch.empty(LARGE, dtype=torch.bfloat16))
    assert not advise_huge_pages(torch.empty(4096, dtype=torch.uint8))  # no whole 2 MB page inside


def test_the_off_switch_gives_no_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HUGE_PAGES_VARIABLE, "0")
    assert not advise_huge_pages(torch.empty(LARGE, dtype=torch.bfloat16))
    assert not bool(zeros_on_huge_pages(LARGE, torch.bfloat16, CPU).any())
