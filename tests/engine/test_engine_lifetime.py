"""An engine goes (with its KV cache) when its last user lets go of it, without waiting for the garbage
collector: the test suite and a trainer that rebuilds engines would otherwise hold several pools at once."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from hawker import LLM, SamplingParams


@pytest.mark.parametrize("overlap", [False, True])
def test_an_engine_is_freed_by_reference_counting(tiny_checkpoints: dict[str, Path], overlap: bool) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", overlap_scheduling=overlap, kv_cache_memory_gb=0.01)
    params = [SamplingParams(max_tokens=3), SamplingParams(max_tokens=4, structured_outputs={"choice": ["ab", "c"]})]
    llm.generate(["hello", "a b"], params, use_tqdm=False)
    engine = weakref.ref(llm.engine)
    gc.disable()
    try:
        del llm
        assert engine() is None, [type(r).__name__ for r in gc.get_referrers(engine())]
    finally:
        gc.enable()
