"""The optimisations' off switches: 1 or unset is on, 0 is off, anything else fails loudly."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hawker.engine.kv_cache import KV_RUNS_VARIABLE, kv_runs_on
from hawker.huge_pages import HUGE_PAGES_VARIABLE, huge_pages_on
from hawker.kernels import cpu_decode_attention, sampling
from hawker.kernels.cpu_prefill_attention import AMX_VARIABLE, amx_requested
from hawker.kernels.rowwise import SWITCH_VARIABLE, switched_on
from hawker.layers.projection import FUSED_SWIGLU_VARIABLE, fused_swiglu_on

SWITCHES = [
    (KV_RUNS_VARIABLE, kv_runs_on),
    (AMX_VARIABLE, amx_requested),
    (SWITCH_VARIABLE, switched_on),
    (FUSED_SWIGLU_VARIABLE, fused_swiglu_on),
    (cpu_decode_attention.AMX_VARIABLE, cpu_decode_attention.amx_tiles),
    (HUGE_PAGES_VARIABLE, huge_pages_on),
    (sampling.SWITCH_VARIABLE, sampling.switched_on),
]


@pytest.mark.parametrize(("variable", "reader"), SWITCHES, ids=[variable for variable, _ in SWITCHES])
def test_a_switch_reads_one_or_zero_and_refuses_anything_else(
    monkeypatch: pytest.MonkeyPatch, variable: str, reader: Callable[[], bool]
) -> None:
    monkeypatch.delenv(variable, raising=False)
    assert reader()
    monkeypatch.setenv(variable, "1")
    assert reader()
    monkeypatch.setenv(variable, "0")
    assert not reader()
    monkeypatch.setenv(variable, "yes")
    with pytest.raises(ValueError, match=f"{variable}='yes': expected 1 or 0"):
        reader()
